"""Client disconnects free their KV blocks at once; SIGTERM drains: in-flight requests finish, new ones get
503, and the process exits 0; a dead or stuck engine process is reported (503, /health), never hung on."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai

from tests.support.server import ServerProcess
from tests.support.wait import wait_until

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
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 0, timeout=10, what="running gauge back to 0")
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
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 0, timeout=10, what="running gauge back to 0")
        assert s.metric("kubellm_kv_cache_usage_ratio") == 0
        assert s.metric("kubellm_generation_tokens_total") < 1500
    finally:
        s.stop()


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def engine_process(server: ServerProcess) -> int:
    """The engine-core child of a `kubellm serve` process."""
    pid = server.proc.pid
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):  # children are listed under the thread that started them
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    for child in children:
        if b"spawn_main" in cmdline(child):
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
        wait_until(lambda: s.metric("kubellm_num_requests_running") == 1, timeout=10, what="a running request")
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
        wait_until(lambda: httpx.get(s.url + "/health").status_code == 503, timeout=15, what="/health 503")
        assert "has not reported" in httpx.get(s.url + "/health").json()["error"]["message"]
        os.kill(engine, signal.SIGCONT)
        wait_until(lambda: httpx.get(s.url + "/health").status_code == 200, timeout=15, what="/health 200 again")
    finally:
        os.kill(engine, signal.SIGCONT)
        s.stop()


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny_model):
    """Independent of the machine's speed: the drained request waits behind a blocker (one batch slot) that
    only the test ends, on an emulated device whose steps take at least 20 ms (bench/stand_in.py), so the
    blocker is still running whatever the probes cost; the drain deadline is far off."""
    s = ServerProcess(
        tiny_model,
        "--drain-timeout-s",
        "600",
        "--max-num-seqs",
        "1",
        "--stand-in-fixed-ms",
        "20",
        module="bench.stand_in",
    ).wait_ready()
    result = {}

    def in_flight():
        body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=600)
        result["status"], result["body"] = r.status_code, r.json()

    blocker_body = {**LONG, "max_tokens": 2000}  # >= 40 s on the emulated device, unless the test ends it
    with httpx.stream("POST", s.url + "/v1/completions", json=blocker_body, timeout=600) as blocker:
        lines = blocker.iter_lines()
        next(lines)  # the blocker holds the only batch slot
        t = threading.Thread(target=in_flight)
        t.start()
        wait_until(lambda: s.metric("kubellm_num_requests_waiting") == 1, timeout=60, what="the request to wait")
        s.terminate()
        wait_until(lambda: httpx.get(s.url + "/ready").status_code == 503, timeout=30, what="readiness to fail")
        late = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert late.status_code == 503 and late.json()["error"]["code"] == 503
        assert httpx.get(s.url + "/health").status_code == 200  # alive while draining
        assert t.is_alive() and s.proc.poll() is None  # the drain waits for both
    # the blocker's client has gone: the queued request runs and finishes in full, then the server exits
    t.join(timeout=600)
    assert result["status"] == 200, result
    assert result["body"]["usage"]["completion_tokens"] == 40
    assert s.proc.wait(timeout=60) == 0
    assert '"event": "drained", "unfinished": 0' in s.logs()
    s.stop()


def test_a_request_cut_off_by_the_drain_deadline_gets_a_clean_error(tiny_model):
    """Past --drain-timeout-s, requests still running end with an OpenAI-shaped 503 (Retry-After), in-band
    for a stream; the process exits 0."""
    s = ServerProcess(tiny_model, "--drain-timeout-s", "1", "--stand-in-fixed-ms", "20", module="bench.stand_in")
    s.wait_ready()
    result = {}

    def plain():
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 2000}, timeout=600)
        result["plain"] = r

    def streamed():
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "max_tokens": 2000}, timeout=600) as r:
            result["events"] = [line for line in r.iter_lines() if line]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    wait_until(lambda: s.metric("kubellm_num_requests_running") == 2, timeout=60, what="both requests running")
    s.terminate()
    for t in threads:
        t.join(timeout=600)
    r = result["plain"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable" and "drain deadline" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1
    events = result["events"]
    assert events[-1] == "data: [DONE]" and "drain deadline" in events[-2], events[-3:]
    assert s.proc.wait(timeout=60) == 0
    s.stop()


def descendants(pid: int) -> set[int]:
    """Every live process below pid."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    children = {int(c) for c in f.read().split()}
            except FileNotFoundError:
                continue
            todo += children - found
            found |= children
    return found


def test_a_tensor_parallel_server_answers_like_hf_and_sigterm_stops_every_rank(tiny_model):
    """`--tensor-parallel-size 2` on the CPU: the engine process starts rank 1's process; streamed tokens
    equal HF's greedy ones; SIGTERM drains and stops the server, the engine process and rank 1, exit 0."""
    from transformers import AutoTokenizer

    from tests.support.hf_reference import hf_greedy

    s = ServerProcess(tiny_model, "--tensor-parallel-size", "2", "--served-model-name", "tiny").wait_ready()
    try:
        procs = descendants(s.proc.pid)  # also multiprocessing's resource tracker
        assert len([p for p in procs if b"spawn_main" in cmdline(p)]) == 2, procs  # the engine process and rank 1
        prompt = "Once upon a time there was a dragon"
        tok = AutoTokenizer.from_pretrained(tiny_model)
        ids = tok(prompt).input_ids
        expected = tok.decode(hf_greedy(tiny_model, [ids], 20)[0])
        before = s.metric("kubellm_generation_tokens_total")  # the warm-up generation's
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        assert "".join(chunk.choices[0].text for chunk in stream) == expected
        r = httpx.post(
            s.url + "/v1/completions",
            json={"model": "tiny", "prompt": ids, "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        )
        assert r.json()["choices"][0]["text"] == expected
        assert s.metric("kubellm_generation_tokens_total") - before == 40
    finally:
        code = s.stop()
    assert code == 0, s.logs()[-3000:]
    # the resource tracker leaves on its own once the server is gone (it reads the server's end of a pipe)
    wait_until(lambda: not any(running(p) for p in procs), timeout=15, what="every process of the server to exit")
