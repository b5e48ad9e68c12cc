"""vLLM's render endpoints on a real `kubellm serve`: /v1/chat/completions/render and /v1/completions/render
answer the prompt token ids a request would run (what the llm-d router's token producer reads), equal to the ids
the same request, run, reports (return_token_ids) and to HF's tokenizer; nothing is generated."""

from __future__ import annotations

import openai
import pytest

from tests.support.api import assert_error, post
from tests.support.server import KEY

CHAT = {
    "model": "tiny",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
    "max_tokens": 5,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def render(server, path: str, body: dict):
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_render_is_the_prompt_the_chat_call_runs(server, client, tok):
    rendered = render(server, "/v1/chat/completions/render", CHAT)
    assert set(rendered) >= {"request_id", "token_ids", "features", "sampling_params", "model", "stream", "priority"}
    assert rendered["request_id"].startswith("chatcmpl-") and rendered["features"] is None
    assert rendered["model"] == "tiny" and rendered["stream"] is False
    assert rendered["sampling_params"]["max_tokens"] == 5 and rendered["sampling_params"]["temperature"] == 0
    ran = client.chat.completions.create(**CHAT, extra_body={"return_token_ids": True})
    assert rendered["token_ids"] == ran.model_extra["prompt_token_ids"]
    text = tok.apply_chat_template(CHAT["messages"], tokenize=False, add_generation_prompt=True)
    assert rendered["token_ids"] == tok.encode(text, add_special_tokens=False)


def test_chat_render_follows_the_template_options(server, tok):
    messages = [*CHAT["messages"], {"role": "assistant", "content": "Once upon"}]
    body = {**CHAT, "messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    rendered = render(server, "/v1/chat/completions/render", body)
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert rendered["token_ids"] == tok.encode(text, add_special_tokens=False)
    plain = render(server, "/v1/chat/completions/render", CHAT)["token_ids"]
    assert rendered["token_ids"] != plain


def test_completions_render_one_entry_per_prompt(server, client, tok):
    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
    rendered = render(server, "/v1/completions/render", {"model": "tiny", "prompt": prompts, "max_tokens": 3})
    assert [r["token_ids"] for r in rendered] == [tok.encode(p) for p in prompts]
    assert len({r["request_id"] for r in rendered}) == 2
    ran = client.completions.create(model="tiny", prompt=prompts, max_tokens=3, extra_body={"return_token_ids": True})
    assert [r["token_ids"] for r in rendered] == [c.model_extra["prompt_token_ids"] for c in ran.choices]
    ids = [5, 6, 7, 8]
    (as_ids,) = render(server, "/v1/completions/render", {"prompt": ids})
    assert as_ids["token_ids"] == ids and as_ids["sampling_params"]["max_tokens"] == 16  # completions' default


def test_render_truncates_as_the_engine_would(server, client, tok):
    body = {"model": "tiny", "prompt": "The quick brown fox jumps over the lazy dog.", "truncate_prompt_tokens": 3}
    (rendered,) = render(server, "/v1/completions/render", body)
    assert rendered["token_ids"] == tok.encode(body["prompt"])[-3:]
    chat = render(server, "/v1/chat/completions/render", {**CHAT, "truncate_prompt_tokens": 4})
    ran = client.chat.completions.create(**CHAT, extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4})
    assert chat["token_ids"] == ran.model_extra["prompt_token_ids"] and len(chat["token_ids"]) == 4


def test_render_generates_nothing(server):
    before = server.metric("kubellm_generation_tokens_total")
    for _ in range(3):
        render(server, "/v1/chat/completions/render", {**CHAT, "max_tokens": 50})
        render(server, "/v1/completions/render", {"prompt": "hi", "max_tokens": 50})
    assert server.metric("kubellm_generation_tokens_total") == before


@pytest.mark.parametrize(
    "path,body,status,param,contains",
    [
        ("/v1/chat/completions/render", {"messages": []}, 400, "messages", ""),
        ("/v1/chat/completions/render", {**CHAT, "model": "other"}, 404, "model", "does not exist"),
        ("/v1/chat/completions/render", {**CHAT, "max_tokens": 10_000}, 400, "max_tokens", "context length"),
        ("/v1/completions/render", {"prompt": ""}, 400, None, "prompt must not be empty"),
        ("/v1/completions/render", {"prompt": [999_999]}, 400, "prompt", "token ids must be in"),
        ("/v1/completions/render", {"prompt": "hi", "guided_regex": "("}, 400, "guided_regex", ""),
        ("/v1/completions/render", {"prompt": ["hi"] * 257}, 400, "prompt", "at most 256 prompts"),
    ],
)
def test_render_refuses_what_the_call_would_refuse(server, path, body, status, param, contains):
    assert_error(post(server, path, body), status, param, contains)


def test_render_needs_the_api_key(server):
    assert_error(post(server, "/v1/completions/render", {"prompt": "hi"}, headers={}), 401)
    assert_error(post(server, "/v1/chat/completions/render", CHAT, headers={"Authorization": "Bearer x"}), 401)
