"""Client disconnects free their KV blocks at once; SIGTERM drains: in-flight requests finish, new ones get
503, and the process exits 0; a dead or stuck engine process is reported (503, /health), never hung on."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.support.kube import wait_for
from tests.support.server import ServerProcess

LONG = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}


def test_disconnect_mid_stream_aborts_and_frees_blocks(tiny_model):
    s = ServerProcess(tiny_model).wait_ready()
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=LONG, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert s.metric("kubellm_num_requests_running") == 1
            assert s.metric("kubellm_kv_cache_usage_ratio") > 0
        # the client is gone: the request is aborted and its blocks freed, long before 1,500 tokens
        wait_for("running gauge back to 0", lambda: s.metric("kubellm_num_requests_running") == 0, timeout=10)
        assert s.metric("vllm:num_requests_running") == 0
        assert s.metric("kubellm_kv_cache_usage_ratio") == 0
        assert s.metric("kubellm_generation_tokens_total") < 1500
        assert s.metric('kubellm_request_success_total{finished_reason="abort"}') == 1
    finally:
        s.stop()


def test_disconnect_of_a_non_streaming_request_aborts_it(tiny_model):
    s = ServerProcess(tiny_model).wait_ready()
    try:
        body = {**LONG, "stream": False}
        try:
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.5)
        except httpx.ReadTimeout:
            pass
        wait_for("running gauge back to 0", lambda: s.metric("kubellm_num_requests_running") == 0, timeout=10)
        assert s.metric("kubellm_kv_cache_usage_ratio") == 0
        assert s.metric("kubellm_generation_tokens_total") < 1500
    finally:
        s.stop()


def engine_process(server: ServerProcess) -> int:
    """The engine-core child of a `kubellm serve` process."""
    pid = server.proc.pid
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):  # children are listed under the thread that started them
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return child
    raise AssertionError(f"no engine process among {children}")


def test_engine_process_death_is_reported_not_hung(tiny_model):
    s = ServerProcess(tiny_model).wait_ready()
    result = {}

    def in_flight():
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "stream": False}, timeout=60)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=in_flight)
    try:
        t.start()
        wait_for("a running request", lambda: s.metric("kubellm_num_requests_running") == 1, timeout=10)
        os.kill(engine_process(s), signal.SIGKILL)
        t.join(30)
        assert result["status"] == 503, result
        assert "engine process exited" in result["body"]["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 503  # liveness fails: Kubernetes restarts the pod
        assert httpx.get(s.url + "/ready").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    finally:
        t.join(60)
        s.stop()


def test_a_stuck_engine_fails_the_liveness_check(tiny_model):
    s = ServerProcess(tiny_model, "--engine-stall-timeout-s", "3").wait_ready()
    engine = engine_process(s)
    try:
        time.sleep(4)  # idle longer than the timeout: heartbeats keep it healthy
        assert httpx.get(s.url + "/health").status_code == 200
        os.kill(engine, signal.SIGSTOP)  # what a hung kernel looks like from outside
        wait_for("/health 503", lambda: httpx.get(s.url + "/health").status_code == 503, timeout=15)
        assert "has not reported" in httpx.get(s.url + "/health").json()["error"]["message"]
        os.kill(engine, signal.SIGCONT)
        wait_for("/health 200 again", lambda: httpx.get(s.url + "/health").status_code == 200, timeout=15)
    finally:
        os.kill(engine, signal.SIGCONT)
        s.stop()


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny_model):
    s = ServerProcess(tiny_model, "--drain-timeout-s", "60").wait_ready()
    result = {}

    def in_flight():
        # long enough (~1,200 tokens) that the drain is still going while the test probes the server
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 1200}, timeout=120)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=in_flight)
    t.start()
    wait_for("the request to be running", lambda: s.metric("kubellm_num_requests_running") == 1, timeout=10)
    s.terminate()
    wait_for("readiness to fail", lambda: httpx.get(s.url + "/ready").status_code == 503, timeout=5)
    late = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert late.status_code == 503 and late.json()["error"]["code"] == 503
    assert httpx.get(s.url + "/health").status_code == 200  # alive while draining
    t.join(timeout=120)
    assert result["status"] == 200
    assert result["body"]["usage"]["completion_tokens"] == 1200
    assert s.proc.wait(timeout=30) == 0
    assert '"event": "drained"' in s.logs()
    s.stop()
