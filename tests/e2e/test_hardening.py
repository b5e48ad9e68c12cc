"""Issue 16 (hardening, server half): nothing a client sends takes the server down. Each test fails on the
code before the fix it names."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.support.api import assert_error, post
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
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=600)  # a slow, shared machine: generous
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=innocent)
    try:
        t.start()
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 1, timeout=300, what="a running request")
        r = httpx.post(s.url + "/v1/completions", json={"prompt": FAULT_MARKER, "max_tokens": 4}, timeout=300)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "InjectedFault" in err["message"], err
        t.join(600)
        assert result["status"] == 200, result
        assert result["body"]["usage"]["completion_tokens"] == 1500
        assert httpx.get(s.url + "/health", timeout=60).status_code == 200
        again = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=300)
        assert again.status_code == 200, again.text
        assert "engine step failed" in s.logs()
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 0, timeout=300, what="running back to 0")
    finally:
        t.join(60)
        s.stop()


# ---------------------------------------------------------------------- 2. load shedding counts sequences
def test_load_shedding_counts_sequences_and_prompts_are_bounded(tiny_model):
    s = ServerProcess(tiny_model, "--max-waiting-requests", "4", "--max-prompts-per-request", "3000").wait_ready()
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [[1]] * 2000, "max_tokens": 1, "n": 2}, timeout=300)
        assert_error(r, 429, contains="waiting")
        assert int(r.headers["retry-after"]) >= 1
        assert s.metric("kubellm_num_requests_waiting") == 0  # nothing of it was queued
        small = httpx.post(s.url + "/v1/completions", json={"prompt": [[1]] * 3, "max_tokens": 1, "n": 2}, timeout=300)
        assert small.status_code == 200, small.text
        assert len(small.json()["choices"]) == 6
    finally:
        s.stop()


def test_prompts_per_request_are_bounded(server):
    r = post(server, "/v1/completions", {"prompt": [[1]] * 257, "max_tokens": 1})
    assert_error(r, 400, "prompt", "at most 256 prompts")


# ---------------------------------------------------------------------- 6. no 500 on client input
@pytest.mark.parametrize(
    "path,raw",
    [
        ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 1}'),
        ("/v1/completions", b'{"prompt": "hi\\udfff there", "max_tokens": 1}'),
        ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}'),
        ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud83d"]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\udc00x"}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/v1/completions", b"[" * 20_000 + b"]" * 20_000),
        ("/v1/completions", b'{"prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"a": '
            + b'{"b": ' * 3000
            + b"1"
            + b"}" * 3000
            + b"}}",
        ),
    ],
)
def test_surrogates_and_deep_nesting_are_400(server, path, raw):
    r = post(server, path, content=raw)
    assert_error(r, 400)


def test_a_valid_surrogate_pair_is_text(server):
    r = post(server, "/v1/completions", content=b'{"prompt": "hi \\ud83d\\ude00", "max_tokens": 1}')
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- 8. API docs off by default
def test_api_docs_are_off_by_default(server):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(server.url + path).status_code == 404, path


# ---------------------------------------------------------------------- 4. header limits, 7. connection timeouts
def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    return sock


def response_or_close(sock: socket.socket) -> bytes:
    """What the server sent before closing the connection (b"" if it closed without a word)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data


def send_all(sock: socket.socket, data: bytes, chunk: int = 1 << 20) -> int:
    """Bytes sent before the server closed the connection."""
    sent = 0
    try:
        for i in range(0, len(data), chunk):
            sock.sendall(data[i : i + chunk])
            sent += len(data[i : i + chunk])
    except (ConnectionResetError, BrokenPipeError):
        pass
    return sent


@pytest.mark.parametrize(
    "head,contains",
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n", b"431"),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20_000)) + b"\r\n",
            b"431",
        ),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", b"431"),
    ],
)
def test_oversized_heads_are_431(server, head, contains):
    with connect(server) as sock:
        send_all(sock, head)
        answer = response_or_close(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 " + contains), answer[:200]
    assert httpx.get(server.url + "/health").status_code == 200


def test_an_unterminated_64_mb_header_is_not_buffered(server):
    with connect(server) as sock:
        sent = send_all(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20))
        answer = response_or_close(sock)
    assert sent < 64 << 20 or answer.startswith(b"HTTP/1.1 431"), (sent, answer[:200])
    assert answer.startswith(b"HTTP/1.1 431") or answer == b""
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def impatient(tiny_model):
    s = ServerProcess(
        tiny_model, "--header-timeout-s", "2", "--body-timeout-s", "2", "--keep-alive-timeout-s", "1"
    ).wait_ready()
    yield s
    s.stop()


@pytest.mark.parametrize(
    "sent,status",
    [
        (b"", b"408"),  # connected, silent
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"408"),  # slow header
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{",  # slow body
            b"408",
        ),
    ],
)
def test_slow_and_silent_connections_are_closed(impatient, sent, status):
    with connect(impatient) as sock:
        sock.sendall(sent)
        answer = response_or_close(sock)  # the server closes it (the socket's own timeout is 60 s)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]


def test_an_idle_keep_alive_connection_is_closed(impatient):
    with connect(impatient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = response_or_close(sock)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}'), answer


def test_a_mid_body_disconnect_logs_no_error(impatient):
    with connect(impatient) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"prompt"')
    time.sleep(2)  # the server notices (a late error line would make this pass wrongly, never fail wrongly)
    httpx.get(impatient.url + "/health")
    logs = impatient.logs()
    assert '"level": "error"' not in logs and "Traceback" not in logs, logs[-3000:]


# ---------------------------------------------------------------------- 3. tokenization off the event loop
def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(tiny_model):
    s = ServerProcess(tiny_model, "--max-body-bytes", str(16 << 20)).wait_ready()
    try:
        word = "a" * (7 << 20)  # the 7 MB word
        r = httpx.post(s.url + "/tokenize", json={"prompt": word}, timeout=120)
        assert_error(r, 400, "prompt", "characters")
        r = httpx.post(s.url + "/v1/completions", json={"prompt": word, "max_tokens": 1}, timeout=120)
        assert_error(r, 400, "prompt", "characters")
        chat = {"messages": [{"role": "user", "content": word}]}
        assert_error(httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=120), 400, "messages")
    finally:
        s.stop()


def test_health_answers_while_prompts_are_tokenized(tiny_model):
    """200 prompts, each as long as the length check lets through, take seconds to tokenize; /health, asked
    again and again meanwhile, never waits for them (compared with the request itself: no fixed time)."""
    s = ServerProcess(tiny_model, "--max-prompts-per-request", "200").wait_ready()
    try:
        longest = max(len(t) for t in __import__("transformers").AutoTokenizer.from_pretrained(tiny_model).get_vocab())
        prompt = "ab " * (2048 * longest // 3 - 1)
        result = {}

        def big():
            start = time.monotonic()
            r = httpx.post(s.url + "/v1/completions", json={"prompt": [prompt] * 200, "max_tokens": 1}, timeout=600)
            result["status"], result["s"] = r.status_code, time.monotonic() - start

        t = threading.Thread(target=big)
        t.start()
        health = []
        with httpx.Client() as client:
            while t.is_alive():
                start = time.monotonic()
                assert client.get(s.url + "/health", timeout=600).status_code == 200
                health.append(time.monotonic() - start)
        t.join()
        assert result["status"] == 400, result  # the prompts are longer than the context, once tokenized
        assert len(health) > 1 and max(health) < result["s"] / 2, (max(health), result, len(health))
    finally:
        s.stop()


# ---------------------------------------------------------------------- 5. rate limit identity, bounded buckets
def completion(s, headers):
    return httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers, timeout=60)


def test_without_keys_a_bearer_string_is_no_identity(tiny_model):
    s = ServerProcess(tiny_model, "--rate-limit-rpm", "6", "--rate-limit-burst", "2").wait_ready()
    try:
        codes = [completion(s, {"Authorization": f"Bearer random-{i}"}).status_code for i in range(3)]
        assert codes == [200, 200, 429]
        # and X-Forwarded-For is not trusted by default
        assert completion(s, {"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    finally:
        s.stop()


def test_a_trusted_proxy_names_the_client(tiny_model):
    s = ServerProcess(
        tiny_model, "--rate-limit-rpm", "6", "--rate-limit-burst", "1", "--forwarded-allow-ips", "127.0.0.1"
    ).wait_ready()
    try:
        assert completion(s, {"X-Forwarded-For": "203.0.113.1"}).status_code == 200
        assert completion(s, {"X-Forwarded-For": "203.0.113.1"}).status_code == 429
        assert completion(s, {"X-Forwarded-For": "203.0.113.2"}).status_code == 200  # another client behind it
    finally:
        s.stop()


def test_rate_limit_buckets_are_bounded(monkeypatch):
    from kubellm.runtime.server import limits

    now = [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    limiter = limits.RateLimiter(rpm=60, burst=2, max_buckets=1000)
    for i in range(5000):  # 1 MB keys cost their digest only, and never more than max_buckets of them
        assert limiter.acquire(f"{i}-" + "k" * 1000) is None
    assert len(limiter) <= 1000
    assert limiter.acquire("a") is None and limiter.acquire("a") is None and limiter.acquire("a") is not None
    now[0] += 10  # every bucket has refilled: they are dropped as callers come
    limiter.acquire("b")
    assert len(limiter) == 1
