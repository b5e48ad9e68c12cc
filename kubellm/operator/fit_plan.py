"""The operator's fit decision: hold an InferenceService's replicas at 0 when its model cannot fit its GPUs.
Pure (no I/O), beside the thin controller (reconcile.py reads the nodes and the live Deployment; handlers.py
hands over a pod's refusal): every rule here is a unit test on plain dicts.

Two sources, one outcome (a `Hold`: replicas 0, the Deployment annotated with the reason and the numbers):
- before any pod starts (`pre_start_hold`), when both sides are knowable: the model's config.json — given in
  `spec.model.config`, else as the model cache's Job reported it in its pod's termination message
  (`cache_report`; a model on a PVC or behind a URI without the cache is not readable by the operator) — and
  one GPU's memory, from `resources.gpuMemory` or the GPU feature discovery label `nvidia.com/gpu.memory`
  of every candidate node (nodes with enough GPUs that match `scheduling.nodeSelector`; one unlabelled
  candidate makes it unknowable). Replicas that are Ready prove the estimate wrong: no pre-start hold then.
  While the cache Job has not completed, the replicas of such a model wait at 0 (reason WAITING_REASON), so
  that no GPU is allocated before the check has run; a Job that completed without a readable config releases
  them (the runtime checks at start).
- at start (`runtime_refusal`): `kubellm serve` exited with fit.EXIT_CODE and its termination message names
  the numbers. The hold stays for that generation of the spec (a spec change lets the replicas start again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from kubellm import fit
from kubellm.downloads import parse_config_report
from kubellm.operator.render import CACHE_URI_ANNOTATION, HOLD_ANNOTATION, quantity_value
from kubellm.operator.spec import InferenceServiceSpec

OPERATOR, RUNTIME = "operator", "runtime"  # who found that the model does not fit
WAITING_REASON = "WaitingForModelConfig"  # a hold until the cache Job reports the config: no refusal (yet)
FROM_SPEC = "spec.model.config"
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


class InvalidModelConfig(ValueError):
    """spec.model.config cannot be estimated (a field missing, an unknown dtype)."""


@dataclass(frozen=True)
class Hold:
    """Replicas held at 0: who refused (OPERATOR before start, RUNTIME at start), for which spec generation,
    the reason and the message with the numbers, and the numbers themselves (fit.FitEstimate's fields)."""

    source: str
    generation: int
    message: str
    numbers: dict
    reason: str = fit.REASON

    @property
    def refuses(self) -> bool:
        """The model does not fit (as opposed to a wait for the cache Job's report)."""
        return self.reason == fit.REASON

    def annotation(self) -> str:
        return json.dumps(
            {"source": self.source, "generation": self.generation, "reason": self.reason, "message": self.message}
            | {"numbers": self.numbers},
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class CacheReport:
    """What the model cache's Job says about the model: whether it has completed (for the spec's URI), the
    config its pod reported (None: none, or unreadable) and that pod's name."""

    complete: bool
    config: dict | None = None
    pod: str = ""


def cache_report(job: dict | None, pods: list[dict], uri: str) -> CacheReport:
    """The cache Job's report for `uri`: its Complete condition (or a succeeded pod) and the config in a
    succeeded pod's termination message (kubellm.downloads:config_report). A Job for another URI (being
    replaced) reports nothing."""
    meta = (job or {}).get("metadata") or {}
    if job is None or (meta.get("annotations") or {}).get(CACHE_URI_ANNOTATION) != uri:
        return CacheReport(False)
    status = job.get("status") or {}
    complete = (status.get("succeeded") or 0) >= 1 or any(
        c.get("type") == "Complete" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated") or {}
            if t.get("exitCode") == 0 and (found := parse_config_report(t.get("message") or "")) and found[0] == uri:
                return CacheReport(complete, found[1], (pod.get("metadata") or {}).get("name", ""))
    return CacheReport(complete)


def uses_cache(spec: InferenceServiceSpec) -> bool:
    return spec.model.cache.enabled and not spec.model.uri.startswith("pvc://")


def model_config(spec: InferenceServiceSpec, cache: CacheReport | None) -> tuple[dict | None, str]:
    """The config.json the fit check reads and where it comes from: spec.model.config wins over the cache's."""
    if spec.model.config is not None:
        return spec.model.config, FROM_SPEC
    if cache is not None and cache.config is not None:
        return cache.config, f"reported by the model cache's Job (pod {cache.pod})"
    return None, ""


def hold_from_annotations(annotations: dict | None) -> Hold | None:
    """The hold a Deployment carries (None: none, or an annotation this code did not write)."""
    try:
        data = json.loads((annotations or {})[HOLD_ANNOTATION])
        return Hold(data["source"], int(data["generation"]), data["message"], data.get("numbers") or {}, data["reason"])
    except (KeyError, TypeError, ValueError):
        return None


def _numbers(estimate: fit.FitEstimate) -> dict:
    return {
        "weights_bytes": estimate.weights_bytes,
        "kv_bytes": estimate.kv_bytes,
        "overhead_bytes": estimate.overhead_bytes,
        "needed_bytes": estimate.needed_bytes,
        "usable_bytes": estimate.usable_bytes,
        "device_memory_bytes": estimate.device_memory_bytes,
    }


def candidate_nodes(spec: InferenceServiceSpec, nodes: list[dict]) -> list[dict]:
    """Nodes a replica could be scheduled on, as far as GPUs and the node selector tell (taints and affinity
    are the scheduler's: a node left in here only makes a refusal less likely)."""
    want, selector = spec.resources.gpus, spec.scheduling.node_selector
    out = []
    for node in nodes:
        meta, status = node.get("metadata") or {}, node.get("status") or {}
        labels = meta.get("labels") or {}
        gpus = str((status.get("allocatable") or {}).get(spec.resources.gpu_resource_name, "0"))
        if gpus.isdigit() and int(gpus) >= want and all(labels.get(k) == v for k, v in selector.items()):
            out.append(node)
    return out


class GpuMemory(NamedTuple):
    bytes: int  # one GPU's memory
    source: str  # where that figure comes from
    fp8_matmuls: bool = True  # whether FP8 weights may stay FP8 there (fit.node_fp8_matmuls)


def gpu_memory(spec: InferenceServiceSpec, nodes: list[dict] | None) -> GpuMemory | None:
    """One GPU's memory, or None when it cannot be known: the spec's resources.gpuMemory, else the largest
    labelled memory among the candidate nodes, provided every candidate is labelled (nodes None: the operator
    may not read nodes). FP8 matmuls are assumed unless every candidate's product is known to lack them."""
    if spec.resources.gpu_memory:
        return GpuMemory(
            int(quantity_value(spec.resources.gpu_memory)), f"resources.gpuMemory {spec.resources.gpu_memory}"
        )
    candidates = candidate_nodes(spec, nodes or [])
    sizes = {n["metadata"]["name"]: fit.node_gpu_memory_bytes(n["metadata"].get("labels") or {}) for n in candidates}
    if not sizes or None in sizes.values():
        return None
    biggest = max(sizes, key=lambda n: sizes[n])
    fp8 = any(fit.node_fp8_matmuls(n["metadata"].get("labels") or {}) for n in candidates)
    return GpuMemory(
        sizes[biggest],
        f"the largest {fit.GPU_MEMORY_LABEL} of the {len(sizes)} candidate node(s) ({biggest}: "
        f"{sizes[biggest] >> 20} MiB{'' if fp8 else ': no FP8 matmuls, FP8 weights held dequantized'})",
        fp8,
    )


def estimate(
    spec: InferenceServiceSpec, memory: int, config: dict | None = None, fp8_matmuls: bool = True
) -> fit.FitEstimate:
    """kubellm/fit.py's estimate for the serve settings the operator renders (runtime/engine/runner.py:
    check_fit does the same at start, against the GPU it got), from `config` (default spec.model.config)."""
    config, r = fit.text_config(spec.model.config if config is None else config), spec.runtime
    missing = [k for k in CONFIG_FIELDS if k not in config]
    if missing:
        raise InvalidModelConfig(f"model.config lacks {', '.join(missing)} (give the model's config.json)")
    try:
        return fit.estimate(
            config,
            memory,
            dtype=r.dtype,
            tensor_parallel_size=max(1, spec.resources.gpus),
            max_model_len=r.max_model_len,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_num_batched_tokens=r.max_num_batched_tokens,
            max_num_seqs=r.max_num_seqs,
            quantization=r.quantization,
            kv_cache_dtype=r.kv_cache_dtype,
            fp8_matmuls=fp8_matmuls,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise InvalidModelConfig(f"model.config cannot be estimated: {e!r}") from None


def needs_cache_report(spec: InferenceServiceSpec) -> bool:
    """Whether the pre-start check would read the cache Job's report (a GPU replica, the cache, no config)."""
    return bool(spec.resources.gpus) and spec.model.config is None and uses_cache(spec)


def needs_nodes(spec: InferenceServiceSpec) -> bool:
    """Whether the pre-start check would read the nodes' labels (a GPU replica, a config or the cache's, no
    gpuMemory)."""
    knowable = spec.model.config is not None or uses_cache(spec)
    return bool(spec.resources.gpus) and knowable and not spec.resources.gpu_memory


def pre_start_hold(
    spec: InferenceServiceSpec, generation: int, nodes: list[dict] | None, cache: CacheReport | None = None
) -> Hold | None:
    """A hold when the model's config and the GPUs' memory are both known and the model does not fit; or,
    while the cache Job that will report the config has not completed and the memory is known, a wait."""
    if not spec.resources.gpus:
        return None
    config, source = model_config(spec, cache)
    waiting = config is None and uses_cache(spec) and not (cache is not None and cache.complete)
    if config is None and not waiting:
        return None
    memory = gpu_memory(spec, nodes)
    if memory is None:
        return None
    if waiting:
        message = (
            "replicas wait at 0 until the model cache's Job reports the model's config: the fit check runs before "
            f"any GPU is allocated [GPU memory: {memory.source}]"
        )
        return Hold(OPERATOR, generation, message, {}, WAITING_REASON)
    try:
        e = estimate(spec, memory.bytes, config, memory.fp8_matmuls)
    except InvalidModelConfig:
        if source == FROM_SPEC:
            raise
        return None  # a config the estimate cannot read (another architecture): the runtime decides at start
    if e.fits:
        return None
    return Hold(
        OPERATOR, generation, f"{e.message()} [model config: {source}; GPU memory: {memory.source}]", _numbers(e)
    )


def runtime_refusal(pods: list[dict]) -> dict | None:
    """The first refusal a runtime container reported (exit fit.EXIT_CODE and its termination message), from
    its current or last state; None when no pod refused."""
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                t = state.get("terminated") or {}
                if t.get("exitCode") == fit.EXIT_CODE and (
                    found := fit.parse_termination_message(t.get("message", ""))
                ):
                    return found | {"pod": pod["metadata"].get("name", "")}
    return None


def hold_for(
    spec: InferenceServiceSpec,
    generation: int,
    live_deployment: dict | None,
    nodes: list[dict] | None,
    refusal: dict | None = None,
    cache: CacheReport | None = None,
) -> Hold | None:
    """Whether to hold replicas at 0, and why: a runtime refusal just seen or already held for this generation
    first (it is what happened), else the pre-start estimate (from `cache`, the cache Job's report, when the
    spec gives no config), unless replicas are serving."""
    serving = ((live_deployment or {}).get("status") or {}).get("readyReplicas", 0) > 0
    if refusal is not None and not serving:
        numbers = {k: v for k, v in refusal.items() if k.endswith("_bytes")}
        message = f"{refusal.get('message', '')} [refused at start by pod {refusal.get('pod', '?')}]"
        return Hold(RUNTIME, generation, message, numbers, refusal.get("reason", fit.REASON))
    held = hold_from_annotations(((live_deployment or {}).get("metadata") or {}).get("annotations"))
    if held is not None and held.source == RUNTIME and held.generation == generation:
        return held
    return None if serving else pre_start_hold(spec, generation, nodes, cache)
