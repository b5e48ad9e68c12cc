"""The operator against a real control plane: examples become Ready, bad objects are refused with CEL
messages, status says why a service is not ready, drift is repaired, the real HPA scales, restarts converge."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.isvc import G, P, V, condition, create_isvc, custom, get_isvc, wait_ready
from tests.support.kube import make_pvc, wait_for
from tests.support.operator import RUNTIME_IMAGE

pytestmark = pytest.mark.cluster
ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests/examples"


def children(ns: str, name: str) -> dict[str, list]:
    sel = f"kubellm.io/inferenceservice={name}"
    return {
        "Deployment": client.AppsV1Api().list_namespaced_deployment(ns, label_selector=sel).items,
        "Service": client.CoreV1Api().list_namespaced_service(ns, label_selector=sel).items,
        "HorizontalPodAutoscaler": client.AutoscalingV2Api()
        .list_namespaced_horizontal_pod_autoscaler(ns, label_selector=sel)
        .items,
        "PodDisruptionBudget": client.PolicyV1Api().list_namespaced_pod_disruption_budget(ns, label_selector=sel).items,
    }


@pytest.mark.parametrize("example", ["minimal", "gpu-autoscaled", "pvc"])
def test_examples_apply_and_become_ready(operator, namespace, kubectl, example):
    docs = yaml.safe_load_all((EXAMPLES / f"{example}.yaml").read_text())
    doc = next(d for d in docs if d["kind"] == "InferenceService")
    name = doc["metadata"]["name"]
    if example == "pvc":
        make_pvc(namespace, "model-store")
    kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / f"{example}.yaml"))
    obj = wait_ready(namespace, name)
    kids = children(namespace, name)
    assert len(kids["Deployment"]) == 1 and len(kids["Service"]) == 1
    dep = kids["Deployment"][0]
    assert dep.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    c = dep.spec.template.spec.containers[0]
    assert c.image == RUNTIME_IMAGE
    assert c.resources.limits["nvidia.com/gpu"] == str(doc["spec"].get("resources", {}).get("gpus", 1))
    autoscaled = doc["spec"].get("autoscaling", {}).get("enabled", True)
    assert len(kids["HorizontalPodAutoscaler"]) == (1 if autoscaled else 0)
    assert len(kids["PodDisruptionBudget"]) == (0 if autoscaled else 1)
    if example == "pvc":
        assert dep.spec.replicas == 2
        wait_for("2 ready replicas", lambda: get_isvc(namespace, name)["status"]["readyReplicas"] == 2)
    status = get_isvc(namespace, name)["status"]
    assert status["url"] == f"http://{name}.{namespace}.svc.cluster.local"
    table = kubectl("get", "kisvc", name, "-n", namespace).stdout
    assert "True" in table and status["url"] in table and status["modelName"] in table

    def ready_event():
        events = kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.kind=InferenceService,involvedObject.name={name}",
            "-o",
            "json",
        ).stdout
        return any(e["reason"] == "Ready" for e in json.loads(events)["items"])

    wait_for("a Ready event on the InferenceService", ready_event, timeout=20)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"model": {"uri": "ftp://x/y"}}, "model.uri must be hf://org/name[@revision], pvc://claim[/path] or s3://"),
        (
            {"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
            "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
        ),
        ({"model": {"uri": "hf://a/b"}, "resources": {"gpus": -1}}, "resources.gpus must not be negative"),
        (
            {"model": {"uri": "hf://a/b"}, "runtime": {"gpuMemoryUtilization": 1.5}},
            "runtime.gpuMemoryUtilization must be in (0, 1]",
        ),
        ({"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--port=9"]}}, "must not set --host, --port or"),
        (
            {"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--tensor-parallel-size=4"]}},
            "--tensor-parallel-size",
        ),
        (
            {"model": {"uri": "hf://a/b"}, "startup": {"timeoutSeconds": 5}},
            "startup.timeoutSeconds must be at least 30",
        ),
        ({"model": {"uri": "hf://a/b"}, "runtime": {"dtype": "int3"}}, "Unsupported value"),
        # argparse abbreviations of owned flags, and owned settings through the environment
        ({"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--po", "9999"]}}, "nor abbreviate a flag"),
        ({"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--tensor", "8"]}}, "nor abbreviate a flag"),
        ({"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--config", "/x"]}}, "nor abbreviate a flag"),
        (
            {
                "model": {"uri": "hf://a/b"},
                "runtime": {"env": [{"name": "KUBELLM_TENSOR_PARALLEL_SIZE", "value": "8"}]},
            },
            "runtime.env must not set KUBELLM_*",
        ),
        (
            {"model": {"uri": "hf://a/b"}, "runtime": {"env": [{"name": "LD_PRELOAD", "value": "/models/x.so"}]}},
            "runtime.env must not set KUBELLM_*",
        ),
        ({"runtime": {}}, "spec.model: Required value"),
        (
            {"model": {"uri": "hf://a/b"}, "runtime": {"speculative": {"enabled": True, "promptLookupMin": 5}}},
            "promptLookupMin must not exceed promptLookupMax",
        ),
        (
            {"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--quantization", "fp8"]}},
            "any other setting the operator owns",
        ),
    ],
)
def test_invalid_objects_are_rejected_with_clear_messages(crd_installed, namespace, spec, message):
    with pytest.raises(ApiException) as err:
        create_isvc(namespace, "bad", spec)
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def test_more_gpus_than_the_cluster_has_is_insufficient_gpu(operator, namespace):
    create_isvc(namespace, "huge", {"model": {"uri": "hf://a/b"}, "resources": {"gpus": 16}})
    obj = wait_for(
        "Ready=False InsufficientGPU",
        lambda: (o := get_isvc(namespace, "huge")) and condition(o).get("reason") == "InsufficientGPU" and o,
        timeout=30,
    )
    ready = condition(obj)
    assert ready["status"] == "False" and "nvidia.com/gpu" in ready["message"]
    assert condition(obj, "WorkloadReady")["reason"] == "InsufficientGPU"


def test_drift_is_repaired_spec_changes_roll_and_deletion_cleans_up(operator, namespace):
    create_isvc(namespace, "svc", {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}, "replicas": 2})
    wait_ready(namespace, "svc")
    apps, core = client.AppsV1Api(), client.CoreV1Api()
    uid = apps.read_namespaced_deployment("svc", namespace).metadata.uid
    # deleted by hand → recreated
    core.delete_namespaced_service("svc", namespace)
    wait_for("the Service to come back", lambda: children(namespace, "svc")["Service"])
    apps.delete_namespaced_deployment("svc", namespace)
    wait_for("a new Deployment", lambda: (d := children(namespace, "svc")["Deployment"]) and d[0].metadata.uid != uid)
    # edited by hand → restored
    apps.patch_namespaced_deployment(
        "svc",
        namespace,
        {"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "runtime", "image": "evil/image:1"}]}}}},
    )
    wait_for(
        "the edit to be undone",
        lambda: (
            (d := apps.read_namespaced_deployment("svc", namespace))
            and d.spec.replicas == 2
            and d.spec.template.spec.containers[0].image == RUNTIME_IMAGE
        ),
    )
    core.patch_namespaced_service("svc", namespace, [{"op": "replace", "path": "/spec/ports/0/port", "value": 81}])
    wait_for(
        "the Service port restored", lambda: core.read_namespaced_service("svc", namespace).spec.ports[0].port == 80
    )
    # a spec change rolls the Deployment
    before = apps.read_namespaced_deployment("svc", namespace).metadata.generation
    custom().patch_namespaced_custom_object(G, V, namespace, P, "svc", {"spec": {"runtime": {"maxNumSeqs": 32}}})
    dep = wait_for(
        "a new template",
        lambda: (d := apps.read_namespaced_deployment("svc", namespace)) and d.metadata.generation > before and d,
    )
    args = dep.spec.template.spec.containers[0].args
    assert args[args.index("--max-num-seqs") + 1] == "32"
    wait_for(
        "the rollout to finish",
        lambda: all(
            "--max-num-seqs" in p.spec.containers[0].args and "32" in p.spec.containers[0].args
            for p in core.list_namespaced_pod(namespace, label_selector="kubellm.io/inferenceservice=svc").items
            if not p.metadata.deletion_timestamp
        ),
        timeout=60,
    )
    wait_ready(namespace, "svc")
    # deleting the InferenceService removes every child
    custom().delete_namespaced_custom_object(G, V, namespace, P, "svc")
    wait_for("no children left", lambda: not any(children(namespace, "svc").values()), timeout=60)


def test_the_hpa_scales_on_queue_depth(operator, namespace, custom_metrics):
    create_isvc(
        namespace,
        "busy",
        {
            "model": {"uri": "hf://a/b"},
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "targetQueueDepth": 5,
                "scaleDownStabilizationSeconds": 0,
            },
        },
    )
    wait_ready(namespace, "busy")
    apps = client.AppsV1Api()
    custom_metrics.set(namespace, "kubellm_num_requests_waiting", 30)  # 30 waiting per pod, target 5
    wait_for("scale up to 3", lambda: apps.read_namespaced_deployment("busy", namespace).spec.replicas == 3, timeout=90)
    wait_for("3 ready replicas", lambda: get_isvc(namespace, "busy")["status"]["readyReplicas"] == 3, timeout=60)
    custom_metrics.set(namespace, "kubellm_num_requests_waiting", 0)
    wait_for(
        "scale down to 1", lambda: apps.read_namespaced_deployment("busy", namespace).spec.replicas == 1, timeout=90
    )


def test_operator_restart_converges_without_duplicates(operator, namespace):
    create_isvc(namespace, "first", {"model": {"uri": "hf://a/b"}})
    wait_ready(namespace, "first")
    operator.kill()
    create_isvc(namespace, "second", {"model": {"uri": "hf://a/b"}})  # arrives while the operator is down
    custom().patch_namespaced_custom_object(G, V, namespace, P, "first", {"spec": {"runtime": {"maxNumSeqs": 8}}})
    operator.start()
    wait_ready(namespace, "second")
    wait_for(
        "first's change applied",
        lambda: (
            "8"
            in client.AppsV1Api().read_namespaced_deployment("first", namespace).spec.template.spec.containers[0].args
        ),
    )
    for name in ("first", "second"):
        kids = children(namespace, name)
        assert [len(kids[k]) for k in ("Deployment", "Service", "HorizontalPodAutoscaler")] == [1, 1, 1]


def test_kubectl_scale_uses_the_scale_subresource(operator, namespace, kubectl):
    create_isvc(namespace, "scalable", {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}})
    wait_ready(namespace, "scalable")
    kubectl("scale", "kisvc", "scalable", "-n", namespace, "--replicas=3")
    assert get_isvc(namespace, "scalable")["spec"]["replicas"] == 3
    wait_for("3 ready replicas", lambda: get_isvc(namespace, "scalable")["status"]["readyReplicas"] == 3, timeout=60)
    assert client.AppsV1Api().read_namespaced_deployment("scalable", namespace).spec.replicas == 3
    assert len(children(namespace, "scalable")["PodDisruptionBudget"]) == 1  # more than one replica now
