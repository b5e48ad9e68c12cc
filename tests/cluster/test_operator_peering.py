"""Two operator replicas with peering (HA): both register in the ClusterKopfPeering, one acts."""

from __future__ import annotations

import pathlib

import httpx
import pytest
from kubernetes import client

from tests.support.isvc import create_isvc, wait_ready
from tests.support.kube import wait_for
from tests.support.operator import OperatorProcess

pytestmark = pytest.mark.cluster
ROOT = pathlib.Path(__file__).resolve().parents[2]


def reconciles(op: OperatorProcess) -> float:
    text = httpx.get(f"http://127.0.0.1:{op.metrics_port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('kubellm_operator_reconciles_total{result="ok"}')
    )


def test_peered_replicas_register_and_serve(cluster, operator, kubectl, namespace):
    kubectl("apply", "-f", str(ROOT / "manifests/peering.yaml"), check=False)  # CRDs first: retry once
    wait_for(
        "the peering CRDs",
        lambda: kubectl("apply", "-f", str(ROOT / "manifests/peering.yaml"), check=False).returncode == 0,
        timeout=30,
    )
    operator.kill()  # the session's standalone operator would act regardless of peering
    replicas = [OperatorProcess(cluster.kubeconfig, "--peering=kubellm", f"--priority={p}") for p in (100, 50)]
    try:
        for r in replicas:
            r.start()

        def peers():
            obj = client.CustomObjectsApi().get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", "kubellm"
            )
            return len(obj.get("status") or {}) >= 2

        wait_for("both replicas in the ClusterKopfPeering", peers, timeout=30)
        create_isvc(namespace, "ha", {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}})
        wait_ready(namespace, "ha")
        active, standby = (reconciles(r) for r in replicas)
        assert active >= 1 and standby == 0, (active, standby)  # the priority-50 replica stood by
    finally:
        for r in replicas:
            r.stop()
        operator.start()


def test_an_operator_limited_to_namespaces_ignores_the_others(cluster, operator, namespace):
    from kubernetes.client import CoreV1Api

    other = f"{namespace}-other"
    CoreV1Api().create_namespace({"metadata": {"name": other}})
    operator.kill()
    scoped = OperatorProcess(cluster.kubeconfig, f"--namespace={namespace}")
    try:
        scoped.start()
        create_isvc(namespace, "mine", {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}})
        create_isvc(other, "not-mine", {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}})
        wait_ready(namespace, "mine")
        assert not client.AppsV1Api().list_namespaced_deployment(other).items
        assert "status" not in client.CustomObjectsApi().get_namespaced_custom_object(
            "kubellm.io", "v1alpha1", other, "inferenceservices", "not-mine"
        )
    finally:
        scoped.stop()
        operator.start()
        CoreV1Api().delete_namespace(other)
