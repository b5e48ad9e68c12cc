"""Every refusal is an OpenAI-shaped error with the right status, over raw HTTP; no input gives a 5xx."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.api import AUTH, assert_error, post
from tests.support.server import KEY, ServerProcess
from tests.support.wait import wait_until


@pytest.mark.parametrize(
    "body,param,contains",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature", ""),
        ({"prompt": "hi", "top_p": 0}, "top_p", ""),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", ""),
        ({"prompt": "hi", "n": 0}, "n", ""),
        ({"prompt": "hi", "logprobs": 50}, "logprobs", ""),
        ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty", ""),
        ({"prompt": ""}, None, "empty"),
        ({"prompt": [[]]}, None, "empty"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, None, "stream"),
        ({"prompt": "hi", "stop": [""]}, None, "stop"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5", ""),
        ({"prompt": "hi", "logit_bias": {"five": 1}}, None, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"999999": 1}}, "logit_bias", "logit_bias token ids must be in [0, "),
        ({"prompt": "hi", "logit_bias": {str(t): 1 for t in range(301)}}, "logit_bias", "at most 300"),
        ({"prompt": [999999]}, "prompt", "token ids"),
        ({}, "prompt", ""),
        ({"prompt": "hi", "max_tokens": 1000}, "max_tokens", "maximum context length is 256"),
        ({"prompt": [5] * 300}, None, "context"),
        ({"prompt": "hi", "best_of": 3}, "best_of", "not supported"),
        ({"prompt": "hi", "guided_regex": "(unclosed"}, "guided_regex", "guided_regex: "),
        ({"prompt": "hi", "guided_choice": []}, "guided_choice", ""),
        ({"prompt": "hi", "guided_json": "{not json"}, "guided_json", "guided_json: "),
        ({"prompt": "hi", "guided_grammar": "start: nonsense_rule"}, "guided_grammar", "guided_grammar: "),
        ({"prompt": "hi", "guided_regex": "a+", "guided_choice": ["a"]}, None, "one structured output at a time"),
        (
            {"prompt": "hi", "structured_outputs": {"regex": "(x"}},
            "structured_outputs.regex",
            "structured_outputs.regex: ",
        ),
    ],
)
def test_invalid_completion_requests_are_400(server, body, param, contains):
    assert_error(post(server, "/v1/completions", body), 400, param, contains)


@pytest.mark.parametrize(
    "body,contains",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs requires logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}, "maximum context length"),
        ({"messages": "hello"}, "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
            "may not set chat_template",
        ),
        (
            {"messages": [{"role": "assistant", "content": "Once"}], "continue_final_message": True},
            "continue_final_message and add_generation_prompt cannot both be true",
        ),
        # asked-for behaviour this server lacks is refused, not ignored; asking for nothing is fine
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
            "json_schema needs json_schema.schema",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, "response_format"),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "auto",
            },
            "requires --enable-auto-tool-choice",  # as vLLM: the server was started without a parser
        ),
    ],
)
def test_invalid_chat_requests_are_400(server, body, contains):
    assert_error(post(server, "/v1/chat/completions", body), 400, contains=contains)


@pytest.mark.parametrize(
    "path,body,param,contains",
    [
        ("/tokenize", {}, None, "exactly one of prompt and messages"),
        ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, None, "exactly one"),
        ("/tokenize", {"messages": []}, "messages", ""),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": 1}, "model": "other"},
            "model",
            "does not exist",
        ),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": True}},
            "chat_template_kwargs",
            "may not set tokenize",
        ),
        ("/detokenize", {"tokens": [999999]}, "tokens", "token ids must be in [0, "),
        ("/detokenize", {"tokens": [-1]}, "tokens.0", ""),
        ("/detokenize", {"tokens": "abc"}, "tokens", ""),
    ],
)
def test_invalid_tokenizer_requests(server, path, body, param, contains):
    status = 404 if contains == "does not exist" else 400
    assert_error(post(server, path, body), status, param, contains)
    assert_error(post(server, path, body, headers={}), 401)  # the key is checked first, as everywhere


def test_cors_allows_the_configured_origin_only(server):
    """--allowed-origins: a browser's preflight (no API key) is answered for that origin, and its requests carry
    the CORS headers; another origin gets none, so the browser refuses to show it the response."""
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "https://ui.example", **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    other = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **ask})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = httpx.get(server.url + "/v1/models", headers={**AUTH, "Origin": "https://ui.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.get(server.url + "/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    # the request itself is still checked: a browser on the allowed origin needs a key like anyone
    assert_error(httpx.get(server.url + "/v1/models", headers={"Origin": "https://ui.example"}), 401)


def test_malformed_json_is_400(server):
    assert_error(post(server, "/v1/completions", content=b'{"prompt": "hi",'), 400, contains="not valid JSON")
    assert_error(post(server, "/v1/completions", content=b"[1, 2]"), 400, contains="JSON object")
    assert_error(post(server, "/v1/completions", content=b"\xff\xfe"), 400, contains="JSON")


def test_fields_of_other_endpoints_are_ignored_even_null(server):
    """n belongs to the generating endpoints; sent to /tokenize (as the fuzzer did, null) it is an ignored extra."""
    r = post(server, "/tokenize", {"prompt": "hi", "n": None, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["count"] >= 1


def test_unknown_model_is_404(server):
    assert_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "model", "gpt-9")


def test_unknown_route_is_404_in_openai_shape(server):
    r = httpx.get(server.url + "/v1/nothing-here", headers=AUTH)
    assert_error(r, 404)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(server, headers):
    assert_error(post(server, "/v1/completions", {"prompt": "hi"}, headers=headers), 401)
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401


def test_probes_and_metrics_stay_open(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    assert "kubellm_num_requests_waiting" in httpx.get(server.url + "/metrics").text


def test_key_file_is_reread_when_it_changes(server, key_file):
    assert (
        post(
            server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer sk-rotated"}
        ).status_code
        == 401
    )
    key_file.write_text(f"{KEY}\nsk-rotated\n")
    try:
        time.sleep(1.2)
        assert (
            post(
                server,
                "/v1/completions",
                {"prompt": "hi", "max_tokens": 1},
                headers={"Authorization": "Bearer sk-rotated"},
            ).status_code
            == 200
        )
    finally:
        key_file.write_text(f"{KEY}\n")


def test_body_too_large_is_413(server):
    assert_error(post(server, "/v1/completions", {"prompt": "x" * 70_000}), 413)


def test_rate_limit_is_429_with_retry_after(tiny_model):
    s = ServerProcess(
        tiny_model, "--rate-limit-rpm", "6", "--rate-limit-burst", "2", "--api-key", "k1", "--api-key", "k2"
    ).wait_ready()
    try:
        codes = [
            post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer k1"})
            for _ in range(3)
        ]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert_error(codes[2], 429, contains="rate limit")
        assert int(codes[2].headers["retry-after"]) >= 1
        # limits are per key
        assert (
            post(
                s, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer k2"}
            ).status_code
            == 200
        )
        assert s.metric('kubellm_rejected_requests_total{reason="rate_limited"}') == 1
    finally:
        s.stop()


def test_full_queue_is_429_not_a_timeout(tiny_model):
    # no drain: stopping the server cuts the two long requests instead of waiting 30 s for them
    s = ServerProcess(
        tiny_model, "--max-num-seqs", "1", "--max-waiting-requests", "1", "--drain-timeout", "0"
    ).wait_ready()
    long = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True}

    def occupy():
        try:
            post(s, "/v1/completions", long, {})
        except httpx.HTTPError:  # cut when the server stops
            pass

    threads = [threading.Thread(target=occupy) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(
            lambda: s.metric("kubellm_num_requests_running") == 1 and s.metric("kubellm_num_requests_waiting") == 1,
            timeout=30,
            what="one running, one waiting",
        )
        r = post(s, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={})
        assert_error(r, 429, contains="waiting")
        assert "retry-after" in r.headers
    finally:
        s.stop()
        for t in threads:
            t.join()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "logprobs",
        "top_logprobs",
        "top_k",
        "min_p",
        "model",
        "repetition_penalty",
        "presence_penalty",
        "stop_token_ids",
        "echo",
        "priority",
        "max_completion_tokens",
        "ignore_eos",
        "role",
        "content",
        "tokens",
        "add_special_tokens",
        "add_generation_prompt",
        "return_token_strs",
        "chat_template_kwargs",
        "continue_final_message",
        "response_format",
        "tools",
        "tool_choice",
        "best_of",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
        "parallel_tool_calls",
        "input",
        "instructions",
        "max_output_tokens",
        "store",
        "previous_response_id",
        "text",
    ]
)
bodies = st.dictionaries(field_names, json_values, max_size=6) | json_values


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies,
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"]),
    base=st.sampled_from(
        [
            {},
            {"prompt": "hi", "max_tokens": 3},
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            {"input": "hi", "max_output_tokens": 3},
        ]
    ),
)
def test_fuzzed_bodies_never_get_a_5xx(server, body, path, base):
    payload = {**base, **body} if isinstance(body, dict) else body
    for name in ("max_tokens", "max_output_tokens"):
        if isinstance(payload, dict) and isinstance(payload.get(name), int):
            payload[name] = min(max(payload[name], -5), 8)  # keep the run short
    if isinstance(payload, dict) and isinstance(payload.get("n"), int):
        payload["n"] = min(payload["n"], 3)
    r = post(server, path, content=json.dumps(payload).encode())
    assert r.status_code < 500, (payload, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
