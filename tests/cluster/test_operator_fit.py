"""The fit check on a real control plane: a model too big for the GPUs of its KWOK nodes (labelled with their
memory, as GPU feature discovery does) is held at 0 replicas before any pod exists, with the numbers in the
status, an Event and `kubectl get kisvc`; one that fits runs; a runtime pod's refusal at start (its status
patched as the kubelet would write it) holds the replicas at 0 instead of a restart loop. With the model cache and
no model.config, the replicas wait at 0 until the cache Job's pod reports the config (its termination message,
written as the kubelet would), then are held with the numbers or released."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from kubellm import fit
from kubellm.downloads import config_report
from tests.support.isvc import G, P, V, condition, create_isvc, custom, get_isvc, wait_ready
from tests.support.kube import wait_for
from tests.support.model_configs import LLAMA_3_1_8B

pytestmark = pytest.mark.cluster
GIB = 1 << 30
POOL = "kubellm.io/test-pool"


@pytest.fixture
def gpu_pool(cluster):
    """A pool of KWOK GPU nodes of its own (a node selector keeps the session's unlabelled nodes out):
    make(memory_mib) adds a 1-GPU node labelled with that memory; the nodes are deleted afterwards."""
    pool, names = f"fit-{uuid.uuid4().hex[:6]}", []

    def make(memory_mib: int) -> str:
        name = f"{pool}-{len(names)}"
        labels = {POOL: pool, fit.GPU_MEMORY_LABEL: str(memory_mib)}
        cluster.create_gpu_node(name, gpus=1, product="TEST-GPU", labels=labels)
        names.append(name)
        return name

    make.pool = pool
    yield make
    for name in names:
        client.CoreV1Api().delete_node(name)


def llama(pool: str, autoscaling: bool = False) -> dict:
    return {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B", "config": LLAMA_3_1_8B},
        "runtime": {"maxModelLen": 8192},
        "resources": {"gpus": 1},
        "scheduling": {"nodeSelector": {POOL: pool}},
        "autoscaling": {"enabled": autoscaling, "maxReplicas": 2},
        "replicas": 1,
    }


def deployment(ns: str, name: str):
    return client.AppsV1Api().read_namespaced_deployment(name, ns)


def pods(ns: str, name: str) -> list:
    return client.CoreV1Api().list_namespaced_pod(ns, label_selector=f"kubellm.io/inferenceservice={name}").items


def wait_reason(ns: str, name: str, reason: str, timeout: float = 60) -> dict:
    return wait_for(
        f"{name} Ready=False {reason}",
        lambda: (o := get_isvc(ns, name)) and condition(o).get("reason") == reason and o,
        timeout=timeout,
    )


def events(ns: str, name: str, reason: str) -> list:
    found = client.CoreV1Api().list_namespaced_event(ns).items
    return [e for e in found if e.involved_object.name == name and e.reason == reason]


def test_too_big_for_every_labelled_node_is_held_before_any_pod_then_a_spec_change_runs_it(
    operator, namespace, gpu_pool, kubectl
):
    gpu_pool(16384)  # a 16 GiB GPU: Llama-3.1-8B in bf16 needs ~16.5 GiB with 8k tokens of KV
    create_isvc(namespace, "llama", llama(gpu_pool.pool, autoscaling=True))  # the HPA must not fight the hold
    obj = wait_reason(namespace, "llama", "InsufficientGPUMemory")
    message = condition(obj)["message"]
    for number in ("weights 14.96 GiB", "8192-token sequence 1.00 GiB", "14.40 GiB usable", "of 16.00 GiB"):
        assert number in message, message
    assert condition(obj, "WorkloadReady")["reason"] == "InsufficientGPUMemory"
    d = deployment(namespace, "llama")
    assert d.spec.replicas == 0 and not pods(namespace, "llama")
    assert "kubellm.io/fit-hold" in d.metadata.annotations
    shown = wait_for("the Event", lambda: events(namespace, "llama", "InsufficientGPUMemory"))
    assert "weights 14.96 GiB" in shown[0].message and shown[0].type == "Warning"
    row = kubectl("get", "kisvc", "llama", "-n", namespace, "--no-headers").stdout.split()
    assert row[1:5] == ["llama", "False", "0", "false"] and row[5] == "InsufficientGPUMemory", row
    assert not pods(namespace, "llama")  # still none: no restart loop, no GPU taken

    # the user says the GPUs are bigger (a spec change): the hold is lifted, the HPA's replica count is back
    custom().patch_namespaced_custom_object(G, V, namespace, P, "llama", {"spec": {"resources": {"gpuMemory": "80Gi"}}})
    wait_ready(namespace, "llama", timeout=90)
    d = deployment(namespace, "llama")
    assert d.spec.replicas == 1 and "kubellm.io/fit-hold" not in (d.metadata.annotations or {})


def test_a_model_that_fits_the_labelled_node_runs(operator, namespace, gpu_pool):
    gpu_pool(81559)  # an H100 80GB as GPU feature discovery labels it
    create_isvc(namespace, "llama", llama(gpu_pool.pool))
    obj = wait_ready(namespace, "llama", timeout=90)
    assert obj["status"]["readyReplicas"] == 1 and deployment(namespace, "llama").spec.replicas == 1


def refused_status(pod) -> dict:
    """What the kubelet writes for a container that exited with fit.EXIT_CODE and its termination message."""
    estimate = fit.estimate(LLAMA_3_1_8B, 16 * GIB, max_model_len=8192)
    terminated = {
        "exitCode": fit.EXIT_CODE,
        "reason": "Error",
        "message": fit.termination_message(estimate),
        "startedAt": "2026-12-01T00:00:00Z",
        "finishedAt": "2026-12-01T00:00:05Z",
    }
    container = pod.spec.containers[0]
    return {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 1,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}},
                    "lastState": {"terminated": terminated},
                }
            ],
        }
    }


def test_a_runtime_refusal_at_start_holds_the_replicas_at_zero_with_the_numbers(operator, namespace, kubectl):
    # no model.config: the operator cannot know the model's size before it starts; the runtime can
    spec = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "autoscaling": {"enabled": False}, "replicas": 2}
    create_isvc(namespace, "llama", spec)
    obj = wait_ready(namespace, "llama", timeout=90)
    generation = obj["metadata"]["generation"]
    (pod, *_) = wait_for("the runtime pods", lambda: (p := pods(namespace, "llama")) and len(p) == 2 and p)
    client.CoreV1Api().patch_namespaced_pod_status(pod.metadata.name, namespace, refused_status(pod))
    # the other replica serves: no hold, but the status names the refusing one
    obj = wait_for(
        "the refusal named among the replicas",
        lambda: (
            (o := get_isvc(namespace, "llama"))
            and "InsufficientGPUMemory" in condition(o, "WorkloadReady")["message"]
            and o
        ),
    )
    assert condition(obj)["status"] == "True" and deployment(namespace, "llama").spec.replicas == 2
    other = next(p for p in pods(namespace, "llama") if p.metadata.name != pod.metadata.name)
    client.CoreV1Api().patch_namespaced_pod_status(other.metadata.name, namespace, refused_status(other))

    wait_for("replicas held at 0", lambda: deployment(namespace, "llama").spec.replicas == 0)
    obj = wait_for(
        "Ready=False InsufficientGPUMemory, held",
        lambda: (o := get_isvc(namespace, "llama")) and "replicas held at 0" in condition(o)["message"] and o,
    )
    ready = condition(obj)
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUMemory")
    assert "kubellm serve refused at start" in ready["message"] and "weights 14.96 GiB" in ready["message"]
    wait_for("no pod left", lambda: not pods(namespace, "llama"))
    annotation = deployment(namespace, "llama").metadata.annotations["kubellm.io/fit-hold"]
    assert '"source":"runtime"' in annotation and f'"generation":{generation}' in annotation
    assert events(namespace, "llama", "InsufficientGPUMemory")

    # a spec change is a new try: the hold is lifted
    custom().patch_namespaced_custom_object(G, V, namespace, P, "llama", {"spec": {"replicas": 1}})
    wait_ready(namespace, "llama", timeout=90)
    assert deployment(namespace, "llama").spec.replicas == 1


# ------------------------------------------------------------------ the config reported by the model cache's Job
CACHED_URI = "s3://models/llama"


def cached_llama(pool: str) -> dict:
    """No model.config: the cache Job will report it. The claim stays unbound (storageClassName "", no volume), so
    KWOK never runs the Job's pod: the test writes what the kubelet would once `kubellm fetch-model` finished."""
    return {
        "model": {"uri": CACHED_URI, "cache": {"enabled": True, "size": "1Gi", "storageClassName": ""}},
        "runtime": {"maxModelLen": 8192},
        "resources": {"gpus": 1},
        "scheduling": {"nodeSelector": {POOL: pool}},
        "autoscaling": {"enabled": False},
        "replicas": 1,
    }


def runtime_pods(ns: str, name: str) -> list:
    selector = f"kubellm.io/inferenceservice={name},app.kubernetes.io/name=kubellm-runtime"
    return client.CoreV1Api().list_namespaced_pod(ns, label_selector=selector).items


def cache_job_succeeds(ns: str, name: str, config: dict) -> str:
    """The cache Job's pod as the kubelet reports it after `kubellm fetch-model --termination-message` exited 0:
    the config report in its termination message. The Job controller then completes the Job."""
    (pod,) = wait_for(
        "the cache Job's pod",
        lambda: client.CoreV1Api().list_namespaced_pod(ns, label_selector=f"job-name={name}").items,
    )
    container = pod.spec.containers[0]
    terminated = {
        "exitCode": 0,
        "reason": "Completed",
        "message": config_report(CACHED_URI, fit.fit_config(config)),
        "startedAt": "2026-12-01T00:00:00Z",
        "finishedAt": "2026-12-01T00:00:05Z",
    }
    status = {
        "phase": "Succeeded",
        "containerStatuses": [
            {
                "name": container.name,
                "image": container.image,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    client.CoreV1Api().patch_namespaced_pod_status(pod.metadata.name, ns, {"status": status})
    wait_for("the cache Job complete", lambda: client.BatchV1Api().read_namespaced_job(name, ns).status.succeeded)
    return pod.metadata.name


def test_replicas_wait_for_the_cache_jobs_config_then_a_too_big_model_is_held_with_the_numbers(
    operator, namespace, gpu_pool
):
    gpu_pool(16384)
    create_isvc(namespace, "llama", cached_llama(gpu_pool.pool))
    obj = wait_reason(namespace, "llama", "ModelCachePending")
    assert "replicas wait at 0 until the model cache's Job reports" in condition(obj, "WorkloadReady")["message"]
    d = deployment(namespace, "llama")
    assert d.spec.replicas == 0 and '"reason":"WaitingForModelConfig"' in d.metadata.annotations["kubellm.io/fit-hold"]
    assert not runtime_pods(namespace, "llama")  # no GPU taken while the model downloads

    cache_pod = cache_job_succeeds(namespace, "llama", LLAMA_3_1_8B)
    obj = wait_reason(namespace, "llama", "InsufficientGPUMemory")
    message = condition(obj)["message"]
    for words in ("weights 14.96 GiB", "14.40 GiB usable", f"reported by the model cache's Job (pod {cache_pod})"):
        assert words in message, message
    assert obj["status"]["modelConfig"]["source"] == "modelCache" and obj["status"]["modelConfig"]["pod"] == cache_pod
    assert deployment(namespace, "llama").spec.replicas == 0 and not runtime_pods(namespace, "llama")
    assert events(namespace, "llama", "InsufficientGPUMemory")


def test_a_model_the_cache_job_reports_small_enough_is_released(operator, namespace, gpu_pool):
    gpu_pool(16384)
    create_isvc(namespace, "small", cached_llama(gpu_pool.pool))
    wait_reason(namespace, "small", "ModelCachePending")
    assert deployment(namespace, "small").spec.replicas == 0 and not runtime_pods(namespace, "small")
    cache_job_succeeds(namespace, "small", {**LLAMA_3_1_8B, "num_hidden_layers": 2})
    d = wait_for(
        "replicas released",
        lambda: (d := deployment(namespace, "small")).spec.replicas == 1 and d,
        timeout=60,
    )
    assert "kubellm.io/fit-hold" not in (d.metadata.annotations or {})
    wait_for("a runtime pod", lambda: runtime_pods(namespace, "small"))
    obj = wait_for(
        "status.modelConfig from the cache",
        lambda: (o := get_isvc(namespace, "small")) and (o["status"].get("modelConfig") or {}).get("pod") and o,
    )
    assert "num_hidden_layers 2" in obj["status"]["modelConfig"]["message"]
