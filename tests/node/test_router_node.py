"""kubellm router on real pods (the issue's must-shows): 3 replicas of one model, a multi-turn chat workload
through the router and through the plain Service in the same run (prefix-cache hits counted by the pods
themselves), a pod killed mid-run, and scale to zero and back with held requests.

The router runs on this host against the node's cluster (`kubellm router --namespace NS`, the admin kubeconfig):
pod IPs are routable here, and it is the same code the chart's `router.enabled` runs from the operator image.
TTFTs are printed for bench/RESULTS.md, never asserted."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.support.node_k8s import P, apply, client_for, get, isvc, pods, ready_pods, service_client
from tests.support.router import KubeRouterProcess
from tests.support.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]
FILLER = "You are a careful assistant for a small team; answer in one short sentence and keep names as given. "


@pytest.fixture
def router(real, namespace):
    r = KubeRouterProcess(str(real[0].kubeconfig), namespace, "--upstream-read-timeout-s", "60")
    try:
        yield r
    finally:
        r.stop()


def prefix_counters(kubectl, ns: str, name: str) -> tuple[float, float]:
    """(hits, queries) of the prefix caches of every Ready pod, read from the pods' own /metrics."""
    hits = queries = 0.0
    for p in ready_pods(kubectl, ns, name):
        for line in httpx.get(f"http://{p['status']['podIP']}:8000/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def conversation(client: openai.OpenAI, model: str, system: str, turns: int, ttfts: list[float]) -> None:
    messages = [{"role": "system", "content": system}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t}: what is {t} plus {t}?"})
        start, first, text = time.perf_counter(), None, ""
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        ttfts.append((first or time.perf_counter()) - start)
        messages.append({"role": "assistant", "content": text})


def workload(client, model, tag: str, conversations=9, turns=4, concurrency=3) -> tuple[list[float], list]:
    ttfts: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(conversation, client, model, f"[{tag}-{c}] {FILLER}", turns, ttfts)
            for c in range(conversations)
        ]
        failures = [f.exception() for f in futures if f.exception() is not None]
    return ttfts, failures


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def test_three_replicas_router_vs_service_then_a_pod_killed(operator_installed, kubectl, namespace, router):
    ns = namespace
    apply(kubectl, ns, isvc("chat", "tiny", replicas=3))
    wait_until(lambda: len(ready_pods(kubectl, ns, "chat")) == 3, timeout=600, interval=2, what="3 ready pods")
    wait_until(
        lambda: [m["id"] for m in httpx.get(router.url + "/v1/models").json()["data"]] == ["chat"],
        timeout=60,
        what="the router to see the model",
    )
    via_router, via_service = client_for("127.0.0.1", router.port), service_client(kubectl, ns, "chat")
    results = {}
    for name, client in (("router", via_router), ("service", via_service)):
        h0, q0 = prefix_counters(kubectl, ns, "chat")
        ttfts, failures = workload(client, "chat", name)
        h1, q1 = prefix_counters(kubectl, ns, "chat")
        results[name] = ((h1 - h0) / max(1.0, q1 - q0), ttfts, failures)
        print(
            f"[node] via {name}: prefix-cache hit rate {results[name][0]:.1%}, {len(ttfts)} turns, "
            f"TTFT p50 {pct(ttfts, 50) * 1e3:.0f} ms p99 {pct(ttfts, 99) * 1e3:.0f} ms, failures {failures}"
        )
    assert results["router"][2] == [] and results["service"][2] == []  # no request lost either way
    assert results["router"][0] > results["service"][0]

    # one pod killed mid-run: a request not yet answered is retried on another pod; one mid-answer ends with a
    # clean error (an error event or a failed request), never a hang or a truncated success
    victim = ready_pods(kubectl, ns, "chat")[0]["metadata"]["name"]
    outcomes: list[str] = []

    def one(i: int) -> None:
        try:
            stream = via_router.completions.create(
                model="chat", prompt=f"request {i}", max_tokens=48, stream=True, extra_body={"ignore_eos": True}
            )
            chunks = list(stream)
            outcomes.append("ok" if chunks and chunks[-1].choices[0].finish_reason == "length" else "truncated")
        except openai.APITimeoutError:
            outcomes.append("hang")
        except (openai.APIError, httpx.HTTPError):
            outcomes.append("error")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(36)]
        time.sleep(3)
        kubectl("delete", "pod", victim, "-n", ns, "--grace-period=0", "--force")
        for f in futures:
            f.result()
    retried = [x for x in router.request_logs() if x["attempts"] > 1]
    print(f"[node] kill mid-run: {sorted(outcomes)}; retried before the first byte: {len(retried)}")
    assert "hang" not in outcomes and "truncated" not in outcomes, outcomes
    assert outcomes.count("ok") >= len(outcomes) - 6  # at most what was in flight when the pod went
    assert via_router.completions.create(model="chat", prompt="after", max_tokens=4).choices[0].text is not None


def test_scale_to_zero_and_back_with_held_requests(operator_installed, kubectl, namespace, real):
    ns = namespace
    spec = {"enabled": True, "minReplicas": 0, "maxReplicas": 1, "idleSeconds": 30}
    apply(kubectl, ns, isvc("zero", "tiny", autoscaling=spec))
    wait_until(lambda: len(ready_pods(kubectl, ns, "zero")) == 1, timeout=600, interval=2, what="1 ready pod")
    r = KubeRouterProcess(str(real[0].kubeconfig), ns, "--max-held-requests", "3", "--hold-timeout-s", "600")
    try:
        wait_until(lambda: not pods(kubectl, ns, "zero"), timeout=300, interval=2, what="idle -> 0 pods")
        status = wait_until(
            lambda: (s := get(kubectl, P, "zero", "-n", ns).get("status") or {}).get("scaledToZero") and s,
            timeout=120,
            interval=2,
            what="status scaledToZero",
        )
        print(f"[node] at zero: {[(c['type'], c['reason']) for c in status['conditions']]}")
        client = client_for("127.0.0.1", r.port)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            held = [
                pool.submit(client.completions.create, model="zero", prompt=f"wake {i}", max_tokens=4, timeout=600)
                for i in range(3)
            ]

            def held_count() -> float:
                for line in r.metrics_text().splitlines():
                    if line.startswith('kubellm_router_held_requests{model="zero"}'):
                        return float(line.rsplit(" ", 1)[1])
                return 0.0

            wait_until(lambda: held_count() == 3, timeout=60, what="3 held requests")
            beyond = httpx.post(
                r.url + "/v1/completions", json={"model": "zero", "prompt": "x", "max_tokens": 1}, timeout=30
            )
            assert beyond.status_code == 429 and int(beyond.headers["Retry-After"]) >= 1
            answers = [f.result() for f in held]
        print(f"[node] 0 -> answered: {time.monotonic() - started:.1f} s for {len(answers)} held requests")
        assert all(a.choices[0].text is not None for a in answers)
        dep = get(kubectl, "deployment", "zero", "-n", ns)
        assert dep["spec"]["replicas"] == 1
    finally:
        r.stop()
