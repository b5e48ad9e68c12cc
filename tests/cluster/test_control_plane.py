"""The local control plane behaves like Kubernetes: GPU scheduling on KWOK nodes, the real HPA acting on a
Pods metric, and garbage collection of dependents."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.support.kube import wait_for

pytestmark = pytest.mark.cluster


def gpu_deployment(name: str, gpus: int, replicas: int = 1) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "example.invalid/runtime:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ]
                },
            },
        },
    }


def pods(namespace: str, app: str):
    return client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"app={app}").items


def is_ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def test_gpu_pods_are_scheduled_on_gpu_nodes_and_become_ready(namespace):
    client.AppsV1Api().create_namespaced_deployment(namespace, gpu_deployment("one-gpu", 1, replicas=2))
    ready = wait_for(
        "2 ready pods",
        lambda: [p for p in pods(namespace, "one-gpu") if is_ready(p)][1:] and pods(namespace, "one-gpu"),
    )
    for pod in ready:
        node = client.CoreV1Api().read_node(pod.spec.node_name)
        assert int(node.status.allocatable["nvidia.com/gpu"]) >= 1
        assert pod.status.phase == "Running"


def test_more_gpus_than_any_node_stays_pending_with_an_event(namespace):
    client.AppsV1Api().create_namespaced_deployment(namespace, gpu_deployment("too-big", 16))

    def failed_scheduling():
        events = client.CoreV1Api().list_namespaced_event(namespace).items
        return [e for e in events if e.reason == "FailedScheduling" and "nvidia.com/gpu" in (e.message or "")]

    events = wait_for("a FailedScheduling event naming the GPU", failed_scheduling)
    assert "Insufficient nvidia.com/gpu" in events[0].message
    assert all(p.status.phase == "Pending" and not p.spec.node_name for p in pods(namespace, "too-big"))


def test_hpa_scales_on_a_pods_metric(namespace, custom_metrics):
    client.AppsV1Api().create_namespaced_deployment(namespace, gpu_deployment("scaled", 1))
    client.AutoscalingV2Api().create_namespaced_horizontal_pod_autoscaler(
        namespace,
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "scaled"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": "kubellm_num_requests_waiting"},
                            "target": {"type": "AverageValue", "averageValue": "5"},
                        },
                    }
                ],
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 0},
                    "scaleDown": {"stabilizationWindowSeconds": 0},
                },
            },
        },
    )
    apps = client.AppsV1Api()
    custom_metrics.set(namespace, "kubellm_num_requests_waiting", 40)  # per pod: far above the target of 5
    wait_for(
        "scale up to 4",
        lambda: apps.read_namespaced_deployment(namespace=namespace, name="scaled").spec.replicas == 4,
        timeout=90,
    )
    custom_metrics.set(namespace, "kubellm_num_requests_waiting", 0)
    wait_for(
        "scale down to 1",
        lambda: apps.read_namespaced_deployment(namespace=namespace, name="scaled").spec.replicas == 1,
        timeout=90,
    )


def test_deleting_an_owner_deletes_its_dependents(namespace):
    core = client.CoreV1Api()
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace)
    wait_for(
        "the dependent to be collected",
        lambda: "dependent" not in [c.metadata.name for c in core.list_namespaced_config_map(namespace).items],
    )
