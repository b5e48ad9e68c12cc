"""The Helm install path on the real node: `helm install` of charts/kubellm with two peering replicas and the
operator's own custom.metrics.k8s.io API; the HPA scales real runtime pods on their real queue depth (read from
their /metrics by the operator: no fake in the metrics path) and back; killing the active operator replica
leaves the other to reconcile a change. Deviations from a user's install: the local image names only (see
test_real_node.py). Runs before test_real_node.py (file order) and uninstalls at the end, so the kubectl
install there starts from a cluster without the chart's objects (CRDs stay, as with any Helm uninstall)."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import subprocess
import threading
import time

import pytest

from tests.support.node_k8s import (
    P,
    apply,
    client_for,
    get,
    isvc,
    make_namespace,
    pods,
    ready_pods,
    wait_deployment_ready,
    wait_isvc_ready,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def helm_release(real, kubectl):
    cluster, node, _ = real
    helm = str(pathlib.Path(node.env["HELM"]) / "helm")
    repo, _, tag = node.images["OPERATOR_IMAGE"].rpartition(":")
    t0 = time.monotonic()
    subprocess.run(
        [
            helm,
            "install",
            "kubellm",
            str(ROOT / "charts/kubellm"),
            "--namespace",
            "kubellm-system",
            "--create-namespace",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--set",
            f"image.repository={repo},image.tag={tag},runtimeImage={node.images['RUNTIME_IMAGE']}",
            "--set",
            "peering.enabled=true,replicas=2,metricsApi.enabled=true",
            "--wait",
            "--timeout=5m",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"[node] helm install (2 replicas, metrics API): {time.monotonic() - t0:.0f}s")
    try:
        yield helm
    finally:
        kubectl("delete", P, "--all-namespaces", "--all", "--wait=true", "--timeout=120s", check=False)
        subprocess.run(
            [helm, "uninstall", "kubellm", "-n", "kubellm-system", "--kubeconfig", str(cluster.kubeconfig), "--wait"],
            capture_output=True,
        )
        kubectl("delete", "namespace", "kubellm-system", "--wait=true", "--timeout=120s", check=False)


@pytest.fixture(scope="module")
def ns(kubectl, models_pv, node, helm_release):
    with make_namespace(kubectl, models_pv, node) as name:
        yield name


def test_helm_install_two_replicas_and_the_metrics_api(helm_release, kubectl):
    dep = wait_deployment_ready(kubectl, "kubellm-system", "kubellm-operator", timeout=120)
    assert dep["status"]["readyReplicas"] == 2

    def available():
        svc = get(kubectl, "apiservice", "v1beta2.custom.metrics.k8s.io")
        return any(c["type"] == "Available" and c["status"] == "True" for c in svc["status"].get("conditions", []))

    wait_until(available, timeout=120, interval=2, what="the operator's custom.metrics.k8s.io APIService Available")
    raw = json.loads(kubectl("get", "--raw", "/apis/custom.metrics.k8s.io/v1beta2").stdout)
    assert "pods/kubellm_num_requests_waiting" in [r["name"] for r in raw["resources"]]


def test_hpa_scales_real_pods_on_real_queue_depth(ns, kubectl):
    spec = isvc(
        "auto",
        "tiny",
        runtime={"maxModelLen": 512, "maxNumSeqs": 1, "maxNumBatchedTokens": 512},
        autoscaling={
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 2,
            "targetQueueDepth": 1,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 0,
        },
    )
    apply(kubectl, ns, spec)
    wait_isvc_ready(kubectl, ns, "auto")
    svc = get(kubectl, "service", "auto", "-n", ns)
    oai = client_for(svc["spec"]["clusterIP"])
    (model,) = [m.id for m in oai.models.list().data]
    stop = threading.Event()
    served = []

    def load():
        while not stop.is_set():
            try:
                oai.completions.create(
                    model=model, prompt="x", max_tokens=200, extra_body={"ignore_eos": True}, timeout=60
                )
                served.append(1)
            except Exception:
                time.sleep(0.2)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        raw = wait_until(
            lambda: (
                (
                    v := json.loads(
                        kubectl(
                            "get",
                            "--raw",
                            f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/kubellm_num_requests_waiting"
                            "?labelSelector=kubellm.io%2Finferenceservice%3Dauto",
                        ).stdout
                    )
                )["items"]
                and any(i["value"] not in ("0", "0m") for i in v["items"])
                and v
            ),
            timeout=60,
            interval=1,
            what="a non-zero queue depth through the custom metrics API",
        )
        print(f"[node] queue depth under load: {[i['value'] for i in raw['items']]}")
        wait_until(lambda: len(ready_pods(kubectl, ns, "auto")) == 2, timeout=300, interval=2, what="HPA: 2 pods")
        hpa = get(kubectl, "hpa", "auto", "-n", ns)
        assert hpa["status"]["desiredReplicas"] == 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert served
    wait_until(lambda: len(pods(kubectl, ns, "auto")) == 1, timeout=300, interval=2, what="HPA: back to 1 pod")
    kubectl("delete", P, "auto", "-n", ns, "--wait=true", "--timeout=120s")


def operator_roles(kubectl) -> tuple[str, str] | None:
    """(active, standby) by kopf's rule: of the live entries in the ClusterKopfPeering status (keyed by pod name:
    the chart sets POD_ID), the highest priority acts and the others pause. Logs cannot tell: a replica that sees
    a higher one at its first look starts paused and never logs "Pausing". None until both replicas are there."""
    items = get(kubectl, "pods", "-n", "kubellm-system", "-l", "app.kubernetes.io/name=kubellm-operator")["items"]
    names = [p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp")]
    status = get(kubectl, "clusterkopfpeering", "kubellm").get("status") or {}
    now = dt.datetime.now(dt.UTC)
    live = {
        pod: peer["priority"]
        for pod, peer in status.items()
        if dt.datetime.fromisoformat(peer["lastseen"]) + dt.timedelta(seconds=peer["lifetime"]) > now
    }
    if len(names) != 2 or not set(names) <= set(live):
        return None
    print(f"[node] peering priorities: {live}")
    active, standby = sorted(names, key=live.get, reverse=True)
    return active, standby


def applied(kubectl, pod: str, ns: str, name: str) -> list[str]:
    """The operator's "applied ..." log lines (one per reconcile) about ns/name in pod's log."""
    out = kubectl("logs", "-n", "kubellm-system", pod, check=False).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [
        r["msg"] for r in lines if r["msg"].startswith("applied") and (r.get("namespace"), r.get("name")) == (ns, name)
    ]


def test_kill_the_active_operator_the_other_reconciles(ns, kubectl):
    active, standby = wait_until(
        lambda: operator_roles(kubectl), timeout=60, interval=1, what="both operator replicas in the peering object"
    )
    apply(kubectl, ns, isvc("ha", "tiny"))
    sel = "kubellm.io/inferenceservice=ha"
    wait_until(lambda: get(kubectl, "deployments", "-n", ns, "-l", sel)["items"], timeout=60, what="reconciled")
    wait_until(lambda: applied(kubectl, active, ns, "ha"), timeout=30, what=f"the active replica {active} logs it")
    assert not applied(kubectl, standby, ns, "ha"), "the standby replica reconciled while the active one ran"

    kubectl("delete", "pod", "-n", "kubellm-system", active, "--grace-period=0", "--force")
    t0 = time.monotonic()
    kubectl("patch", P, "ha", "-n", ns, "--type=merge", "-p", '{"spec": {"runtime": {"maxNumSeqs": 3}}}')

    def reconciled():
        (dep,) = get(kubectl, "deployments", "-n", ns, "-l", sel)["items"]
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        return args[args.index("--max-num-seqs") + 1] == "3"

    wait_until(reconciled, timeout=180, interval=1, what="the standby replica reconciles the change")
    print(f"[node] change reconciled {time.monotonic() - t0:.0f}s after the active operator was killed")
    # the standby did it, not the pod that replaced the killed one (it started later: lower priority, standing by)
    assert applied(kubectl, standby, ns, "ha")
    pods_now = get(kubectl, "pods", "-n", "kubellm-system", "-l", "app.kubernetes.io/name=kubellm-operator")["items"]
    for replacement in {p["metadata"]["name"] for p in pods_now} - {active, standby}:
        assert not applied(kubectl, replacement, ns, "ha"), f"the replacement {replacement} reconciled"
    kubectl("delete", P, "ha", "-n", ns, "--wait=true", "--timeout=120s")
