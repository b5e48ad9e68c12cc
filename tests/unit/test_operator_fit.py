"""The operator's fit decision (kubellm/operator/fit_plan.py, pure) and what follows from it: the Deployment
held at 0 with the reason and the numbers (render), the status that says so (compute_status), the Reconciler
applying and lifting a hold (against the recording API)."""

from __future__ import annotations

import copy
import json

import pytest
from kubernetes import client

from kubellm import fit
from kubellm.downloads import config_report, parse_config_report
from kubellm.operator import fit_plan
from kubellm.operator.render import HOLD_ANNOTATION, render
from kubellm.operator.spec import parse_spec
from kubellm.operator.status import compute_status, pod_problem
from tests.support.model_configs import LLAMA_3_1_8B
from tests.support.recording_api import recording_reconciler

GIB = 1 << 30
SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B", "config": LLAMA_3_1_8B}, "runtime": {"maxModelLen": 8192}}


def node(name: str, gpus: int = 1, memory_mib: int | None = None, **labels) -> dict:
    if memory_mib is not None:
        labels[fit.GPU_MEMORY_LABEL] = str(memory_mib)
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}


def spec(**changes) -> object:
    s = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        d = s
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return parse_spec(s)


def isvc(s: dict = SPEC, generation: int = 1) -> dict:
    meta = {"name": "llama", "namespace": "ns", "uid": "u1", "generation": generation}
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "InferenceService", "metadata": meta, "spec": s}


def refused_pod(name: str = "llama-abc", where: str = "lastState", deleting: bool = False) -> dict:
    message = fit.termination_message(fit.estimate(LLAMA_3_1_8B, 16 * GIB, max_model_len=8192))
    terminated = {"terminated": {"exitCode": fit.EXIT_CODE, "reason": "Error", "message": message}}
    cs = {"name": "runtime", "restartCount": 1, "ready": False, where: terminated}
    if where == "lastState":
        cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}
    meta = {"name": name, **({"deletionTimestamp": "2026-12-01T00:00:00Z"} if deleting else {})}
    return {"metadata": meta, "status": {"containerStatuses": [cs]}}


# ------------------------------------------------------------------ before any pod starts
def test_a_model_too_big_for_every_candidate_node_is_held_with_the_numbers():
    nodes = [node("a", memory_mib=16384), node("b", memory_mib=16384)]
    hold = fit_plan.pre_start_hold(spec(), 3, nodes)
    assert hold is not None and hold.source == fit_plan.OPERATOR and hold.generation == 3
    assert hold.reason == "InsufficientGPUMemory"
    for number in ("weights 14.96 GiB", "8192-token sequence 1.00 GiB", "14.40 GiB usable", "of 16.00 GiB"):
        assert number in hold.message
    assert "2 candidate node(s)" in hold.message
    assert hold.numbers["needed_bytes"] > hold.numbers["usable_bytes"] == int(16 * GIB * 0.9)


def test_an_fp8_kv_cache_halves_the_kv_estimate():
    bf16 = fit_plan.estimate(spec(), 16 * GIB)
    fp8 = fit_plan.estimate(spec(runtime__kvCacheDtype="fp8"), 16 * GIB)
    assert bf16.kv_bytes == 8192 * 32 * 2 * 8 * 128 * 2  # Llama-3.1-8B: 32 layers, K and V, 8 KV heads of 128
    assert fp8.kv_bytes * 2 == bf16.kv_bytes and fp8.weights_bytes == bf16.weights_bytes
    # a GPU between the two needs: the bf16 cache is held, the FP8 one starts
    memory_mib = int((fp8.needed_bytes + bf16.kv_bytes // 4) / 0.9) >> 20
    nodes = [node("a", memory_mib=memory_mib)]
    assert fit_plan.pre_start_hold(spec(), 1, nodes) is not None
    assert fit_plan.pre_start_hold(spec(runtime__kvCacheDtype="fp8"), 1, nodes) is None


def test_fp8_weights_count_as_bf16_only_where_every_candidate_gpu_lacks_fp8_matmuls():
    """--quantization fp8 on 16 GiB GPUs: FP8 weights fit; on Ampere (no FP8 matmuls) they are held in bf16 and
    do not. The pre-start check holds only when every candidate is known to lack them."""
    fp8 = spec(runtime__quantization="fp8")
    assert fit_plan.estimate(fp8, 16 * GIB).fits and not fit_plan.estimate(fp8, 16 * GIB, fp8_matmuls=False).fits
    product = fit.GPU_PRODUCT_LABEL
    ampere = [
        node("a", memory_mib=16384, **{product: "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"}),
        node("b", memory_mib=16384, **{product: "NVIDIA-A10G"}),
    ]
    hold = fit_plan.pre_start_hold(fp8, 1, ampere)
    assert hold is not None and "no FP8 matmuls" in hold.message and "weights 14.96 GiB" in hold.message
    ada = node("c", memory_mib=16384, **{product: "NVIDIA-L4"})
    assert fit_plan.pre_start_hold(fp8, 1, [*ampere, ada]) is None  # it may land on the L4
    assert fit_plan.pre_start_hold(fp8, 1, [node("d", memory_mib=16384)]) is None  # unknown product: optimistic
    for name in ("NVIDIA-H100-80GB-HBM3", "NVIDIA-GeForce-RTX-4090", "NVIDIA-RTX-6000-Ada-Generation", "NVIDIA-B200"):
        assert fit.node_fp8_matmuls({product: name}), name
    for name in ("Tesla-T4", "Tesla-V100-SXM2-16GB", "NVIDIA-RTX-A6000", "NVIDIA-GeForce-RTX-3090", "NVIDIA-A2"):
        assert not fit.node_fp8_matmuls({product: name}), name


def test_one_big_enough_candidate_unlabelled_nodes_or_no_config_mean_no_hold():
    small = node("small", memory_mib=16384)
    assert fit_plan.pre_start_hold(spec(), 1, [small, node("h100", memory_mib=81559)]) is None
    assert fit_plan.pre_start_hold(spec(), 1, [small, node("unknown")]) is None  # it might fit there
    assert fit_plan.pre_start_hold(spec(), 1, None) is None  # nodes unreadable
    assert fit_plan.pre_start_hold(spec(), 1, []) is None  # no GPU node at all: the scheduler says so
    no_config = parse_spec({"model": {"uri": "pvc://models/llama"}})
    assert fit_plan.pre_start_hold(no_config, 1, [small]) is None
    assert fit_plan.pre_start_hold(spec(resources__gpus=0), 1, [small]) is None  # CPU: no GPU to check


def test_candidates_follow_the_node_selector_and_the_gpu_count():
    nodes = [node("small", memory_mib=16384, pool="a"), node("unlabelled", pool="b"), node("big-1gpu", 1, 81559)]
    assert fit_plan.pre_start_hold(spec(scheduling__nodeSelector={"pool": "a"}), 1, nodes) is not None
    assert fit_plan.pre_start_hold(spec(scheduling__nodeSelector={"pool": "b"}), 1, nodes) is None
    two = [node("small-2", 2, 16384), node("big-1gpu", 1, 81559)]  # two GPUs: only small-2 is a candidate
    # split across two 16 GiB GPUs the 8B model fits (tensor parallel: half the weights each)
    assert fit_plan.pre_start_hold(spec(resources__gpus=2), 1, two) is None
    assert fit_plan.pre_start_hold(spec(resources__gpus=2, runtime__maxModelLen=131072), 1, two) is not None


def test_resources_gpu_memory_is_used_before_the_labels():
    nodes = [node("h100", memory_mib=81559)]
    hold = fit_plan.pre_start_hold(spec(resources__gpuMemory="16Gi"), 1, nodes)
    assert hold is not None and "resources.gpuMemory 16Gi" in hold.message
    assert fit_plan.pre_start_hold(spec(resources__gpuMemory="80Gi"), 1, [node("small", memory_mib=1)]) is None
    assert not fit_plan.needs_nodes(spec(resources__gpuMemory="80Gi")) and fit_plan.needs_nodes(spec())


def test_an_incomplete_config_is_refused_naming_the_fields():
    bad = parse_spec({"model": {"uri": "hf://a/b", "config": {"hidden_size": 64}}})
    with pytest.raises(fit_plan.InvalidModelConfig, match="num_hidden_layers, num_attention_heads"):
        fit_plan.pre_start_hold(bad, 1, [node("a", memory_mib=16384)])
    odd = parse_spec({"model": {"uri": "hf://a/b", "config": {**LLAMA_3_1_8B, "torch_dtype": "int3"}}})
    with pytest.raises(fit_plan.InvalidModelConfig, match="int3"):
        fit_plan.pre_start_hold(odd, 1, [node("a", memory_mib=16384)])


def test_serving_replicas_overrule_the_estimate():
    serving = {"metadata": {}, "status": {"readyReplicas": 1}}
    assert fit_plan.hold_for(spec(), 1, serving, [node("a", memory_mib=16384)]) is None
    assert fit_plan.hold_for(spec(), 1, None, [node("a", memory_mib=16384)]) is not None


# ------------------------------------------------------------------ a runtime's refusal at start
def test_a_runtime_refusal_is_read_from_the_current_or_last_state():
    for where in ("lastState", "state"):
        found = fit_plan.runtime_refusal([refused_pod(where=where)])
        assert found is not None and found["pod"] == "llama-abc" and found["usable_bytes"] == int(16 * GIB * 0.9)
    assert fit_plan.runtime_refusal([refused_pod(deleting=True)]) is None
    crashed = refused_pod()
    crashed["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] = 1
    assert fit_plan.runtime_refusal([crashed]) is None
    garbled = refused_pod()
    garbled["status"]["containerStatuses"][0]["lastState"]["terminated"]["message"] = "Traceback ..."
    assert fit_plan.runtime_refusal([garbled]) is None


def test_a_runtime_hold_lasts_for_its_generation_only():
    s, refusal = parse_spec({"model": {"uri": "pvc://m/llama"}}), fit_plan.runtime_refusal([refused_pod()])
    hold = fit_plan.hold_for(s, 4, None, None, refusal)
    assert hold.source == fit_plan.RUNTIME and "refused at start by pod llama-abc" in hold.message
    assert "weights 14.96 GiB" in hold.message and hold.numbers["kv_bytes"] == 2 * 32 * 8 * 128 * 8192 * 2
    held = {"metadata": {"annotations": {HOLD_ANNOTATION: hold.annotation()}}, "status": {}}
    assert fit_plan.hold_for(s, 4, held, None) == hold  # no pod left, still held
    assert fit_plan.hold_for(s, 5, held, None) is None  # the spec changed: try again
    assert fit_plan.hold_from_annotations({HOLD_ANNOTATION: "not json"}) is None


# ------------------------------------------------------------------ render and status
def test_a_held_deployment_has_no_replicas_and_says_why():
    hold = fit_plan.pre_start_hold(spec(), 1, [node("a", memory_mib=16384)])
    held = {c["kind"]: c for c in render(isvc(), hold.annotation())}["Deployment"]
    assert held["spec"]["replicas"] == 0
    assert fit_plan.hold_from_annotations(held["metadata"]["annotations"]) == hold
    free = {c["kind"]: c for c in render(isvc())}["Deployment"]
    assert "replicas" not in free["spec"] and "annotations" not in free["metadata"]  # the HPA's again


def test_status_of_a_held_model_is_insufficient_gpu_memory_with_the_numbers():
    s = {**SPEC, "autoscaling": {"minReplicas": 0}}
    hold = fit_plan.pre_start_hold(parse_spec(s), 1, [node("a", memory_mib=16384)])
    deployment = render(isvc(s), hold.annotation())[0] | {"status": {}}
    status = compute_status(isvc(s), deployment, None, [])
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUMemory")
    assert "replicas held at 0" in ready["message"] and "weights 14.96 GiB" in ready["message"]
    assert status["scaledToZero"] is False  # at 0 because it cannot fit, not because it is idle


def test_a_refusing_pod_is_named_as_such_not_as_a_crash_loop():
    import datetime as dt

    problem = pod_problem(refused_pod(), "nvidia.com/gpu", 1800, dt.datetime.now(dt.UTC))
    assert problem[0] == "InsufficientGPUMemory" and "weights 14.96 GiB" in problem[1] and "restarts: 1" in problem[1]


# ------------------------------------------------------------------ the Reconciler
def test_the_reconciler_holds_on_a_refusal_keeps_the_hold_and_lifts_it_on_a_spec_change():
    r, api = recording_reconciler()
    s = {"model": {"uri": "pvc://m/llama"}, "resources": {"gpus": 1}}
    first = isvc(s, generation=2)
    changed, hold = r.reconcile(first)
    assert hold is None and "replicas" not in api.store[("Deployment", "ns", "llama")]["spec"]
    changed, hold = r.reconcile(first, refusal=fit_plan.runtime_refusal([refused_pod()]))
    stored = api.store[("Deployment", "ns", "llama")]
    assert hold.source == fit_plan.RUNTIME and stored["spec"]["replicas"] == 0
    assert json.loads(stored["metadata"]["annotations"][HOLD_ANNOTATION])["numbers"]["needed_bytes"] > 0
    assert r.reconcile(first).hold == hold  # a resync (operator restart) keeps it
    assert r.reconcile(isvc(s, generation=3)).hold is None  # the spec changed
    assert "replicas" not in api.store[("Deployment", "ns", "llama")]["spec"]


def test_the_reconciler_reads_the_nodes_labels_for_the_pre_start_check():
    r, api = recording_reconciler()
    api.nodes = [
        client.V1Node(
            metadata=client.V1ObjectMeta(name="a", labels={fit.GPU_MEMORY_LABEL: "16384"}),
            status=client.V1NodeStatus(allocatable={"nvidia.com/gpu": "8"}),
        )
    ]
    _, hold = r.reconcile(isvc())
    assert hold is not None and "(a: 16384 MiB)" in hold.message
    assert api.store[("Deployment", "ns", "llama")]["spec"]["replicas"] == 0
    api.nodes[0].metadata.labels[fit.GPU_MEMORY_LABEL] = "81559"  # a bigger GPU: the next look lifts it
    assert r.reconcile(isvc()).hold is None


def test_nodes_the_operator_may_not_read_leave_the_check_to_the_runtime():
    from kubernetes.client.exceptions import ApiException

    r, api = recording_reconciler()

    def forbidden():
        raise ApiException(status=403)

    api.list_node = forbidden  # namespaced RBAC without the node reader
    assert r.nodes() is None
    changed, hold = r.reconcile(isvc())
    assert hold is None and "Deployment" in changed
    assert "replicas" not in api.store[("Deployment", "ns", "llama")]["spec"]
    s = {**SPEC, "resources": {"gpuMemory": "16Gi"}}  # stated in the spec: no node needed
    assert r.reconcile(isvc(s)).hold is not None


# ------------------------------------------------------------------ the model cache's report (config from its Job)
CACHE_URI = "hf://meta-llama/Llama-3.1-8B"
CACHED = {
    "model": {"uri": CACHE_URI, "cache": {"enabled": True}},
    "runtime": {"maxModelLen": 8192},
    "resources": {"gpus": 1},
}


def cache_job(uri: str = CACHE_URI, complete: bool = True) -> dict:
    status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]} if complete else {"active": 1}
    meta = {"name": "llama", "uid": "uid-Job", "annotations": {"kubellm.io/model-uri": uri}}
    return {"metadata": meta, "status": status}


def cache_pod(config: dict | None = LLAMA_3_1_8B, uri: str = CACHE_URI, exit_code: int = 0) -> dict:
    """The cache Job's pod as the kubelet reports it once `kubellm fetch-model` wrote its termination message."""
    message = config_report(uri, fit.fit_config(config)) if config is not None else ""
    terminated = {"exitCode": exit_code, "reason": "Completed", "message": message}
    labels = {"batch.kubernetes.io/controller-uid": "uid-Job"}
    meta = {"name": "llama-cache-x", "namespace": "ns", "labels": labels}
    cs = {"name": "fetch-model", "state": {"terminated": terminated}}
    return {"metadata": meta, "status": {"containerStatuses": [cs]}}


def test_the_reported_config_gives_the_same_estimate_and_fits_a_termination_message():
    big_moe = {**LLAMA_3_1_8B, "num_experts": 128, "moe_intermediate_size": 768, "architectures": ["X"] * 500}
    for config in (LLAMA_3_1_8B, big_moe, {"text_config": LLAMA_3_1_8B, "vision_config": {"depth": 32}}):
        reported = parse_config_report(config_report("s3://b/m", fit.fit_config(config)))
        assert reported is not None and reported[0] == "s3://b/m"
        assert fit.estimate(reported[1], 80 * GIB) == fit.estimate(fit.text_config(config), 80 * GIB)
        assert len(config_report("s3://b/m", fit.fit_config(config)).encode()) < 1024  # Kubernetes keeps 4 KiB
    quantized = {**LLAMA_3_1_8B, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128] * 400}}
    assert fit.estimate(fit.fit_config(quantized), GIB) == fit.estimate(quantized, GIB)
    for junk in ("", "Traceback (most recent call last):", '{"kubellmModelConfig": {"uri": 1}}', "[1]"):
        assert parse_config_report(junk) is None


def test_the_cache_report_is_the_completed_jobs_config_for_the_specs_uri():
    report = fit_plan.cache_report(cache_job(), [cache_pod()], CACHE_URI)
    assert report.complete and report.pod == "llama-cache-x" and report.config["hidden_size"] == 4096
    assert fit_plan.cache_report(cache_job(complete=False), [], CACHE_URI) == fit_plan.CacheReport(False)
    assert fit_plan.cache_report(None, [], CACHE_URI) == fit_plan.CacheReport(False)
    # a Job for the URI before a change (being replaced) reports nothing; nor a pod that reported another URI
    assert fit_plan.cache_report(cache_job(uri="hf://a/old"), [cache_pod()], CACHE_URI) == fit_plan.CacheReport(False)
    assert fit_plan.cache_report(cache_job(), [cache_pod(uri="hf://a/old")], CACHE_URI).config is None
    assert fit_plan.cache_report(cache_job(), [cache_pod(exit_code=1)], CACHE_URI).config is None
    assert fit_plan.cache_report(cache_job(), [cache_pod(config=None)], CACHE_URI) == fit_plan.CacheReport(True)


def test_replicas_wait_for_the_cache_then_are_held_with_the_numbers_or_released():
    s, nodes = parse_spec(CACHED), [node("a", memory_mib=16384)]
    waiting = fit_plan.pre_start_hold(s, 1, nodes, fit_plan.cache_report(cache_job(complete=False), [], CACHE_URI))
    assert waiting.reason == fit_plan.WAITING_REASON and not waiting.refuses and "(a: 16384 MiB)" in waiting.message
    assert fit_plan.needs_cache_report(s) and fit_plan.needs_nodes(s)
    held = fit_plan.pre_start_hold(s, 1, nodes, fit_plan.cache_report(cache_job(), [cache_pod()], CACHE_URI))
    assert held.refuses and held.source == fit_plan.OPERATOR
    for words in ("weights 14.96 GiB", "14.40 GiB usable", "reported by the model cache's Job (pod llama-cache-x)"):
        assert words in held.message
    report = fit_plan.cache_report(cache_job(), [cache_pod()], CACHE_URI)
    assert fit_plan.pre_start_hold(s, 1, [node("h100", memory_mib=81559)], report) is None  # it fits
    # a completed Job without a readable config, or an estimate it cannot make: the runtime checks at start
    assert fit_plan.pre_start_hold(s, 1, nodes, fit_plan.CacheReport(True)) is None
    odd = fit_plan.CacheReport(True, {"hidden_size": 64}, "p")
    assert fit_plan.pre_start_hold(s, 1, nodes, odd) is None
    # unknown GPU memory: no reason to wait; no GPU: nothing to check
    assert fit_plan.pre_start_hold(s, 1, [node("unlabelled")], fit_plan.CacheReport(False)) is None
    cpu = parse_spec({**CACHED, "resources": {"gpus": 0}})
    assert fit_plan.pre_start_hold(cpu, 1, nodes, fit_plan.CacheReport(False)) is None
    assert not fit_plan.needs_cache_report(cpu) and not fit_plan.needs_nodes(cpu)


def test_spec_model_config_wins_over_the_cache_report():
    small = {**LLAMA_3_1_8B, "num_hidden_layers": 2}
    s = parse_spec({**CACHED, "model": {**CACHED["model"], "config": small}})
    report = fit_plan.cache_report(cache_job(), [cache_pod()], CACHE_URI)  # the 8B model: too big for 16 GiB
    assert fit_plan.pre_start_hold(s, 1, [node("a", memory_mib=16384)], report) is None
    assert fit_plan.model_config(s, report) == (small, fit_plan.FROM_SPEC)
    assert not fit_plan.needs_cache_report(s)  # nothing to wait for either


def test_status_while_waiting_says_how_far_the_cache_is_and_where_the_config_came_from():
    s = {**CACHED, "resources": {"gpus": 1, "gpuMemory": "16Gi"}}
    waiting = fit_plan.pre_start_hold(parse_spec(s), 1, None, fit_plan.CacheReport(False))
    deployment = render(isvc(s), waiting.annotation())[0] | {"status": {}}
    running_job = cache_job(complete=False)
    status = compute_status(isvc(s), deployment, None, [], cache=(running_job, None))
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "DownloadingModel")
    assert "replicas wait at 0 until the model cache's Job reports" in ready["message"]
    assert status["modelConfig"] is None
    done = compute_status(isvc(s), render(isvc(s))[0] | {"status": {}}, None, [], cache=(cache_job(), None),
                          cache_pods=[cache_pod()])  # fmt: skip
    assert done["modelConfig"]["source"] == "modelCache" and done["modelConfig"]["pod"] == "llama-cache-x"
    assert "num_hidden_layers 32, hidden_size 4096" in done["modelConfig"]["message"]
    given = compute_status(isvc(SPEC), None, None, [])
    assert given["modelConfig"]["source"] == "spec.model.config"


def test_the_reconciler_waits_for_the_cache_job_then_holds_or_releases():
    r, api = recording_reconciler()
    s = {**CACHED, "resources": {"gpus": 1, "gpuMemory": "16Gi"}}
    assert r.reconcile(isvc(s)).hold.reason == fit_plan.WAITING_REASON
    deployment = api.store[("Deployment", "ns", "llama")]
    assert deployment["spec"]["replicas"] == 0 and ("Job", "create") in api.calls  # the Job runs meanwhile
    job = api.store[("Job", "ns", "llama")]
    job["status"] = cache_job()["status"]
    api.pods = [cache_pod()]
    hold = r.reconcile(isvc(s)).hold
    assert hold.refuses and "weights 14.96 GiB" in hold.message and ("Pod", "list") in api.calls
    assert api.store[("Deployment", "ns", "llama")]["spec"]["replicas"] == 0
    api.pods = [cache_pod({**LLAMA_3_1_8B, "num_hidden_layers": 2})]  # a model that fits: released
    assert r.reconcile(isvc(s)).hold is None
    assert "replicas" not in api.store[("Deployment", "ns", "llama")]["spec"]
