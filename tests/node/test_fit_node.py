"""The runtime's fit refusal on the real node: `kubellm serve` in a real pod refuses a model that does not fit
its device (a CPU memory budget, --device-memory-bytes, stands in for a GPU's memory: this node has no GPU),
exits with fit.EXIT_CODE and writes the numbers to its termination-message file; the operator, installed from
manifests/operator.yaml, reads them from the pod's status and holds the replicas at 0: the reason with the
numbers in the InferenceService's status and an Event, and no restart loop."""

from __future__ import annotations

import time

import pytest

from kubellm.fit import human_bytes
from tests.support.node_k8s import P, apply, get, isvc, make_namespace, pods
from tests.support.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(600)]
BUDGET = 100_000  # bytes: far below the tiny model's weights


@pytest.fixture
def namespace(operator_installed, kubectl, models_pv, node):
    with make_namespace(kubectl, models_pv, node) as ns:
        yield ns


def test_runtime_fit_refusal_holds_the_replicas_at_zero_with_the_numbers(namespace, kubectl):
    ns = namespace
    body = isvc("toobig", "tiny")
    body["spec"]["runtime"]["extraArgs"] = ["--device-memory-bytes", str(BUDGET)]
    apply(kubectl, ns, body)
    most_restarts = 0

    def held():
        nonlocal most_restarts
        for p in pods(kubectl, ns, "toobig"):
            for cs in p["status"].get("containerStatuses") or []:
                most_restarts = max(most_restarts, cs.get("restartCount", 0))
        o = get(kubectl, P, "toobig", "-n", ns)
        ready = next((c for c in (o.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})
        return ready if "replicas held at 0" in ready.get("message", "") else None

    t0 = time.monotonic()
    ready = wait_until(held, timeout=300, interval=1, what="toobig held at 0 replicas")
    print(f"[node] fit refusal surfaced in {time.monotonic() - t0:.0f}s: {ready['message']}")
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUMemory")
    message = ready["message"]
    assert "kubellm serve refused at start" in message and "the model does not fit: weights" in message
    assert f"of {human_bytes(BUDGET)})" in message, message  # KiB: a tiny budget, not "0.00 GiB"
    deployment = get(kubectl, "deployment", "toobig", "-n", ns)
    assert deployment["spec"]["replicas"] == 0
    assert '"source":"runtime"' in deployment["metadata"]["annotations"]["kubellm.io/fit-hold"]
    events = get(kubectl, "events", "-n", ns, "--field-selector", "involvedObject.name=toobig")["items"]
    assert any(e["reason"] == "InsufficientGPUMemory" and "weights" in e["message"] for e in events), events

    # no restart loop: the pod is gone and stays gone, and it restarted at most twice before the hold
    wait_until(lambda: not pods(kubectl, ns, "toobig"), timeout=120, interval=2, what="no toobig pod")
    time.sleep(30)  # past the kubelet's first back-off and a few status ticks
    assert not pods(kubectl, ns, "toobig") and most_restarts <= 2, most_restarts
    assert get(kubectl, "deployment", "toobig", "-n", ns)["spec"]["replicas"] == 0
    row = kubectl("get", "kisvc", "toobig", "-n", ns, "--no-headers").stdout.split()
    assert row[2:4] == ["False", "0"] and row[5] == "InsufficientGPUMemory", row
