"""Raw-HTTP helpers for the e2e tests of the OpenAI endpoints: post with the shared server's key, and check an
error is OpenAI-shaped with the right status (and param, and words)."""

from __future__ import annotations

import httpx
import openai

from tests.support.server import KEY

AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path, body=None, headers=AUTH, content=None):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: str = ""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    assert contains.lower() in err["message"].lower()
    if param is not None:
        assert err["param"] == param


# a function tool the tool-calling tests share (bounded enums: a random-weight model still produces valid calls)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def greedy_token_ids(client: openai.OpenAI, model: str) -> list[int]:
    """The token ids of a short greedy completion (outputs compared across adapters, pods and routes)."""
    r = client.completions.create(
        model=model,
        prompt="the quick brown fox",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return r.choices[0].model_extra["token_ids"]
