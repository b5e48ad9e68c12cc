"""Issue 16 (hardening, server half): nothing a client sends takes the server down. Each test fails on the
code before the fix it names."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.e2e.test_errors import AUTH, assert_error, post
from tests.support.faulty_serve import FAULT_MARKER
from tests.support.server import ServerProcess
from tests.support.wait import wait_until

BIG = 2**63  # one past int64
HUGE = 10**30


# ---------------------------------------------------------------------- 1. numeric bounds, per-request failures
@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": BIG, "top_p": 0.5}, "top_k"),  # the issue's
        ("/v1/completions", {"prompt": "hi", "top_k": HUGE}, "top_k"),
        ("/v1/completions", {"prompt": "hi", "seed": BIG}, "seed"),
        ("/v1/completions", {"prompt": "hi", "seed": -BIG - 1}, "seed"),
        ("/v1/completions", {"prompt": "hi", "priority": HUGE}, "priority"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": HUGE}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": HUGE}, "n"),
        ("/v1/completions", {"prompt": "hi", "logprobs": HUGE}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "presence_penalty": 1e308}, "presence_penalty"),
        ("/v1/completions", {"prompt": "hi", "frequency_penalty": -1e308}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e308}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "hi", "temperature": 1e308}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [BIG]}, "stop_token_ids.0"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [100_000]}, None),  # past the vocabulary
        ("/v1/completions", {"prompt": "hi", "logit_bias": {str(BIG): 1}}, "logit_bias.9223372036854775808.[key]"),
        ("/v1/completions", {"prompt": [BIG]}, None),
        ("/v1/completions", {"prompt": [[1, HUGE]]}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": BIG}, "top_k"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": HUGE}, "seed"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": HUGE},
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": HUGE}, None),
        ("/detokenize", {"tokens": [BIG]}, None),
    ],
)
def test_numeric_extremes_are_400_and_the_engine_lives_on(server, path, body, param):
    r = post(server, path, body)
    assert_error(r, 400, param)
    assert httpx.get(server.url + "/health").status_code == 200
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_top_k_past_the_vocabulary_means_all_of_it(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 2**31 - 1, "top_p": 0.5})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1, "n": 3})
    assert r.status_code == 200, r.text


def test_a_request_failing_inside_a_step_fails_alone(tiny_model):
    """The engine core raises in the step that first runs one request (tests/support/faulty_serve.py): that
    request gets a clean OpenAI error, a request running beside it finishes, and the engine keeps serving."""
    s = ServerProcess(tiny_model, module="tests.support.faulty_serve").wait_ready()
    result = {}

    def innocent():
        body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=innocent)
    try:
        t.start()
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 1, timeout=30, what="a running request")
        r = httpx.post(s.url + "/v1/completions", json={"prompt": FAULT_MARKER, "max_tokens": 4}, timeout=60)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "InjectedFault" in err["message"], err
        t.join(120)
        assert result["status"] == 200, result
        assert result["body"]["usage"]["completion_tokens"] == 1500
        assert httpx.get(s.url + "/health").status_code == 200
        again = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert again.status_code == 200, again.text
        assert "engine step failed" in s.logs()
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 0, timeout=10, what="running back to 0")
    finally:
        t.join(60)
        s.stop()
