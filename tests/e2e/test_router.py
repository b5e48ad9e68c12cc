"""`kubellm router` as a real process in front of fake pods (tests/support/fake_backend.py: real HTTP servers
streaming at a fixed token rate, with vLLM gauges on /metrics) and in front of real `kubellm serve` processes.

Routes come from a static file the router re-reads (the cluster's EndpointSlices in production)."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from tests.support.router import FakeBackends, RouterProcess
from tests.support.server import KEY, ServerProcess
from tests.support.wait import wait_until


def chat(router, model="fake", content="hello", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}
    return httpx.post(router.url + "/v1/chat/completions", json=body, timeout=60)


def metric(router, name: str, **labels) -> float:
    """A sample of the router's /metrics (0 when the series does not exist yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(router.url + "/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


@pytest.fixture
def routes_file(tmp_path):
    return str(tmp_path / "routes.json")


@pytest.fixture
def backends():
    started = []

    def start(count, **kw):
        b = FakeBackends(count, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def router(routes_file):
    started = []

    def start(routes, *args):
        r = RouterProcess(routes_file, routes, *args)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def test_routes_by_model_lists_models_and_refuses_unknown_ones(backends, router):
    a, b = backends(2, models="model-a"), backends(2, models="model-b")
    r = router({"model-a": a.urls, "model-b": b.urls})
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="sk-any")
    assert sorted(m.id for m in client.models.list()) == ["model-a", "model-b"]
    for i in range(6):
        for model, pods in (("model-a", a), ("model-b", b)):
            got = chat(r, model, f"question {i}")
            assert got.status_code == 200 and got.json()["model"] == model
            assert got.headers["X-Backend"] in {f"pod-{p}" for p in pods.ports}
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model"
    assert chat(r, model=None).status_code == 400
    bad = httpx.post(r.url + "/v1/completions", content=b"[1, 2]", timeout=10)
    assert bad.status_code == 400 and "JSON object" in bad.json()["error"]["message"]


def test_streams_pass_through_as_produced_and_keys_reach_the_pod(backends, router):
    slow = backends(1, token_rate=5)  # one token each 0.2 s
    r = router({"fake": slow.urls})
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="sk-user-key")
    raw = client.chat.completions.with_raw_response.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.headers["X-Saw-Authorization"] == "Bearer sk-user-key"
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content == "tok "
    # the first chunk is here while the pod is still generating: nothing waited for the whole answer
    assert "vllm:num_requests_running{" in (m := httpx.get(slow.urls[0] + "/metrics").text)
    assert 'vllm:num_requests_running{model_name="fake"} 1' in m
    rest = list(stream)
    assert len(rest) == 9 and rest[-1].choices[0].finish_reason == "length"


def test_a_conversation_keeps_its_pod_and_conversations_spread(backends, router):
    pods = backends(4)
    r = router({"fake": pods.urls})
    served = collections.defaultdict(set)
    for turn in range(3):
        for conv in range(16):
            messages = [{"role": "system", "content": f"conversation {conv}"}]
            messages += [{"role": "user", "content": f"turn {t}"} for t in range(turn + 1)]
            got = httpx.post(
                r.url + "/v1/chat/completions", json={"model": "fake", "messages": messages, "max_tokens": 1}
            )
            served[conv].add(got.headers["X-Backend"])
    assert all(len(s) == 1 for s in served.values()), served
    assert len({next(iter(s)) for s in served.values()}) >= 3
    assert metric(r, "kubellm_router_routed_total", model="fake", choice="affinity") == 48


def test_a_dead_pod_is_retried_elsewhere_before_the_first_byte(backends, router):
    dead, alive = backends(1), backends(1)
    r = router({"fake": dead.urls + alive.urls})
    dead.kill()
    answers = [chat(r, content=f"prompt {i}") for i in range(12)]
    assert all(a.status_code == 200 and a.headers["X-Backend"] == f"pod-{alive.ports[0]}" for a in answers)
    assert metric(r, "kubellm_router_attempts_total", model="fake", outcome="connect_error") >= 1
    retried = [x for x in r.request_logs() if x["attempts"] == 2]
    assert retried and all(x["status"] == 200 for x in retried)


def test_a_pod_silent_mid_stream_ends_the_stream_with_an_error_event(backends, router):
    pods = backends(1)
    httpx.post(pods.urls[0] + "/fake/load", json={"stall_after": 2})
    r = router({"fake": pods.urls}, "--upstream-read-timeout-s", "2")
    client = openai.OpenAI(base_url=r.url + "/v1", api_key="k", max_retries=0, timeout=60)
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=10, stream=True
        ):
            got.append(chunk)
    assert len(got) == 2 and "mid-stream" in str(e.value)
    assert metric(r, "kubellm_router_attempts_total", model="fake", outcome="broken_stream") == 1


def test_saturated_pods_get_429_with_retry_after(backends, router):
    pods = backends(2, token_rate=2)
    r = router({"fake": pods.urls}, "--max-in-flight-per-pod", "1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = [pool.submit(chat, r, "fake", "same prefix", max_tokens=20) for _ in range(2)]
        wait_until(lambda: metric(r, "kubellm_router_in_flight_requests", model="fake") == 2, what="2 open streams")
        refused = chat(r, content="same prefix")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "saturated" in refused.json()["error"]["message"]
        assert {f.result().headers["X-Backend"] for f in long} == {f"pod-{p}" for p in pods.ports}


def test_a_pod_with_a_long_queue_is_passed_over(backends, router):
    pods = backends(2)
    httpx.post(pods.urls[0] + "/fake/load", json={"waiting": 50})  # others' traffic queued there
    r = router({"fake": pods.urls}, "--max-waiting-per-pod", "8")
    wait_until(lambda: chat(r, content="probe").status_code == 200, what="the router")
    wait_until(
        lambda: all(chat(r, content=f"p{i}").headers["X-Backend"] == f"pod-{pods.ports[1]}" for i in range(10)),
        timeout=10,
        what="the scrape of the queued pod to steer every request away from it",
    )


def test_a_model_at_zero_holds_requests_scales_up_and_bounds_the_wait(backends, router):
    pods = backends(1, models="cold")
    r = router({"cold": {"endpoints": [], "idleSeconds": 600, "replicas": 0}}, "--max-held-requests", "2")
    assert [m["id"] for m in httpx.get(r.url + "/v1/models").json()["data"]] == ["cold"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(chat, r, "cold", f"q{i}") for i in range(2)]
        wait_until(lambda: metric(r, "kubellm_router_held_requests", model="cold") == 2, what="2 held requests")
        assert metric(r, "kubellm_router_scale_events_total", model="cold", replicas="1") == 1
        beyond = chat(r, "cold", "q3")
        assert beyond.status_code == 429 and int(beyond.headers["Retry-After"]) >= 1
        r.write_routes({"cold": {"endpoints": pods.urls, "idleSeconds": 600}})  # a pod became Ready
        assert [f.result().status_code for f in held] == [200, 200]
    assert metric(r, "kubellm_router_held_requests", model="cold") == 0


def test_a_held_request_times_out_with_503_and_retry_after(router):
    r = router({"cold": {"endpoints": [], "idleSeconds": 600, "replicas": 0}}, "--hold-timeout-s", "1")
    got = chat(r, "cold")
    assert got.status_code == 503 and got.headers["Retry-After"]


def test_an_idle_model_is_scaled_to_zero_after_its_window(backends, router):
    pods = backends(1, models="idle,busy")
    r = router({"idle": {"endpoints": pods.urls, "idleSeconds": 2}, "busy": pods.urls})
    wait_until(
        lambda: metric(r, "kubellm_router_scale_events_total", model="idle", replicas="0") == 1,
        timeout=30,
        what="the idle model scaled to zero",
    )
    assert metric(r, "kubellm_router_scale_events_total", model="busy", replicas="0") == 0


def test_traffic_that_bypasses_the_router_keeps_a_model_up(backends, router):
    pods = backends(1, models="shared")
    r = router({"shared": {"endpoints": pods.urls, "idleSeconds": 5}})
    body = {"model": "shared", "prompt": "x", "max_tokens": 1}
    for _ in range(20):  # 10 s of requests straight to the pod (its Service), none through the router
        assert httpx.post(pods.urls[0] + "/v1/completions", json=body).status_code == 200
        time.sleep(0.5)
    assert metric(r, "kubellm_router_scale_events_total", model="shared", replicas="0") == 0
    wait_until(
        lambda: metric(r, "kubellm_router_scale_events_total", model="shared", replicas="0") == 1,
        timeout=30,
        what="scaled to zero once the pod went quiet",
    )


# ------------------------------------------------------------------- real kubellm serve pods
def served_logs(server) -> list[dict]:
    lines = [json.loads(x) for x in server.logs().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "request_finished"]


@pytest.fixture(scope="module")
def two_models(tiny_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("router-keys") / "keys"
    keys.write_text(KEY + "\n")
    servers = [
        ServerProcess(tiny_model, "--served-model-name", "tiny-a", "--max-model-len", "256"),
        ServerProcess(
            tiny_model, "--served-model-name", "tiny-b", "--max-model-len", "256", "--api-key-file", str(keys)
        ),
    ]
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for s in servers:
            s.stop()


def test_two_real_models_behind_one_endpoint(two_models, router):
    a, b = two_models
    r = router({"tiny-a": [a.url], "tiny-b": [b.url]})
    client = openai.OpenAI(base_url=r.url + "/v1", api_key=KEY)
    assert sorted(m.id for m in client.models.list()) == ["tiny-a", "tiny-b"]
    for model in ("tiny-a", "tiny-b"):
        done = client.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
        direct = openai.OpenAI(base_url=(a if model == "tiny-a" else b).url + "/v1", api_key=KEY)
        same = direct.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
        assert done.choices[0].text == same.choices[0].text and done.usage.completion_tokens == 4
        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    wrong = openai.OpenAI(base_url=r.url + "/v1", api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):  # tiny-b checks keys: the router passed the wrong one on
        wrong.completions.create(model="tiny-b", prompt="hello", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-c", prompt="hello", max_tokens=1)
    logs = r.request_logs()
    assert {x["model"] for x in logs} >= {"tiny-a", "tiny-b", "tiny-c"}
    assert all(len(x["trace_id"]) == 32 for x in logs)
    # the router's trace id reaches the pod (W3C traceparent): one id in both logs
    routed = {x["trace_id"] for x in logs if x["model"] == "tiny-a"}
    assert routed & {x.get("trace_id") for x in served_logs(a)}
