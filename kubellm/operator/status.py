"""compute_status: the InferenceService's status from its children and pods, honestly. Pure (no I/O).

`Ready` aggregates the sub-conditions that apply (WorkloadReady always, AutoscalerReady when autoscaling is
on, Accepted when the operator refuses the spec: ChildConflict, PolicyViolation, InvalidRuntimeArgs,
ForbiddenEnv, InvalidModelConfig; or when the API server rejects a child: ApplyRejected); reasons say what the
pods are actually doing: InsufficientGPU, Unschedulable, ImagePullBackOff, CrashLoopBackOff, OOMKilled,
StartupTimeout, InsufficientGPUMemory (a runtime refused to start: the model does not fit), … A Deployment
held at 0 because the model does not fit (operator/fit_plan.py) is WorkloadReady=False InsufficientGPUMemory
with the numbers; one waiting at 0 for the model cache's report says how far the cache is.
`modelConfig` says where the fit check's model config comes from (the spec, or the cache Job's pod).
"""

from __future__ import annotations

import datetime as dt

from kubellm import fit
from kubellm.downloads import DownloadProgress
from kubellm.operator.adapters import PodAdapters, adapter_status
from kubellm.operator.fit_plan import FROM_SPEC, RUNTIME, Hold, cache_report, hold_from_annotations, uses_cache
from kubellm.operator.render import adapter_paths, selector_for, service_url
from kubellm.operator.spec import InferenceServiceSpec, parse_spec
from kubellm.operator.startup import cache_status, replica_phase, startup_reason, summary

PULL_ERRORS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age_seconds(timestamp: str | None, now: dt.datetime) -> float:
    if not timestamp:
        return 0.0
    t = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return (now - t).total_seconds()


def _cond(obj: dict | None, kind: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def pod_problem(pod: dict, gpu_resource: str, startup_timeout: float, now: dt.datetime) -> tuple[str, str] | None:
    """Why this pod is not serving, as (reason, message); None when it is Ready or still starting normally."""
    status = pod.get("status") or {}
    ready = _cond(pod, "Ready")
    if ready and ready.get("status") == "True":
        return None
    scheduled = _cond(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        message = scheduled.get("message", "")
        if gpu_resource in message:
            return "InsufficientGPU", f"no node has a free {gpu_resource} for this replica: {message}"
        return "Unschedulable", message
    for cs in status.get("containerStatuses") or []:  # kubellm serve refused at start: the numbers, not a crash
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            t = state.get("terminated") or {}
            if t.get("exitCode") == fit.EXIT_CODE and (refusal := fit.parse_termination_message(t.get("message", ""))):
                return refusal["reason"], f"{refusal.get('message', '')} (restarts: {cs.get('restartCount', 0)})"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if waiting.get("reason") in PULL_ERRORS:
            return "ImagePullBackOff", waiting.get("message") or f"cannot pull {cs.get('image')}"
        if last.get("reason") == "OOMKilled":
            return "OOMKilled", f"container {cs['name']} ran out of memory (restarts: {cs.get('restartCount', 0)})"
        if waiting.get("reason") == "CrashLoopBackOff":
            return "CrashLoopBackOff", waiting.get("message") or f"container {cs['name']} keeps crashing"
    for cs in status.get("containerStatuses") or []:  # restarted (e.g. its liveness probe failed): say so
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if last and cs.get("restartCount", 0) and not cs.get("ready"):
            return "Restarted", (
                f"container {cs['name']} restarted (restarts: {cs['restartCount']}; last exit: "
                f"{last.get('reason', '?')}, code {last.get('exitCode', '?')} at {last.get('finishedAt', '?')})"
            )
    started = status.get("startTime") or (pod.get("metadata") or {}).get("creationTimestamp")
    if _age_seconds(started, now) > startup_timeout:
        return "StartupTimeout", f"not ready after {int(startup_timeout)}s (startup.timeoutSeconds)"
    return None


def _condition(kind: str, ok: bool | None, reason: str, message: str, generation: int) -> dict:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": kind, "status": status, "reason": reason, "message": message, "observedGeneration": generation}


def _at_zero(spec: InferenceServiceSpec, hold: Hold | None, generation: int, cache: dict | None) -> dict:
    """WorkloadReady of a Deployment at 0 on purpose: held (the model does not fit, or waiting for the model
    cache's report: then how far the cache is says more) or scaled to zero."""
    if hold is not None and not hold.refuses:
        reason, message = startup_reason(cache, [], []) or (hold.reason, "the model cache is complete")
        return _condition("WorkloadReady", False, reason, f"{message}; {hold.message}", generation)
    if hold is not None:
        who = "kubellm serve refused at start" if hold.source == RUNTIME else "the operator's fit check"
        message = f"replicas held at 0 ({who}; change the spec to try again): {hold.message}"
        return _condition("WorkloadReady", False, hold.reason, message, generation)
    return _condition(
        "WorkloadReady",
        False,
        "ScaledToZero",
        f"no replicas after {spec.autoscaling.idle_seconds} s without a request; kubellm router holds the next "
        "request and scales back to 1",
        generation,
    )


def model_config_status(spec: InferenceServiceSpec, job: dict | None, cache_pods: list[dict]) -> dict | None:
    """{source, message[, pod]}: where the fit check's model config comes from; None when it has none."""
    if spec.model.config is not None:
        return {"source": FROM_SPEC, "message": "given in the spec (it wins over the model cache's report)"}
    if not uses_cache(spec):
        return None
    report = cache_report(job, cache_pods, spec.model.uri)
    if report.config is None:
        return None
    c = fit.text_config(report.config)
    shape = ", ".join(
        f"{k} {c[k]}" for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "torch_dtype") if k in c
    )
    message = f"reported by the model cache's Job (pod {report.pod}) for {spec.model.uri}: {shape}"
    return {"source": "modelCache", "pod": report.pod, "message": message}


def compute_status(
    isvc: dict,
    deployment: dict | None,
    hpa: dict | None,
    pods: list[dict],
    now: dt.datetime | None = None,
    refusal: tuple[str, str] | None = None,
    adapters: dict[str, PodAdapters] | None = None,
    cache: tuple[dict | None, dict | None] = (None, None),
    downloads: dict[str, DownloadProgress] | None = None,
    cache_pods: list[dict] | None = None,
    phases: dict[str, str] | None = None,
) -> dict:
    """`refusal` is why the operator does not apply the spec as written (reason, message): an `Accepted=False`
    condition, present only then, that Ready reports first (the children keep their last accepted state).
    `adapters`: each Ready pod's LoRA adapters as the adapter sync last saw them (None: no sync ran), reported as
    `replicaAdapters` and an AdaptersReady condition that Ready does not include (a failed adapter leaves the
    model serving). `cache` is the model cache's (Job, claim), `cache_pods` the Job's pods (their termination
    messages: status.modelConfig); `downloads` the downloaders' last progress and `phases` the starting runtimes'
    start-up phases, by pod name."""
    now = now or dt.datetime.now(dt.UTC)
    meta = isvc["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation", 0)
    spec = parse_spec(isvc.get("spec") or {})
    dstatus = (deployment or {}).get("status") or {}
    ready_replicas = dstatus.get("readyReplicas", 0)
    live_pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]

    downloads = downloads or {}
    pod_problems = [
        (p, pod_problem(p, spec.resources.gpu_resource_name, spec.startup.timeout_seconds, now)) for p in live_pods
    ]
    problems = [pp for _, pp in pod_problems if pp]
    phases = phases or {}
    replica_phases = [
        replica_phase(p, pp, downloads.get(p["metadata"].get("name", "")), phases.get(p["metadata"].get("name", "")))
        for p, pp in pod_problems
    ]
    cache_now = cache_status(*cache, downloads) if spec.model.cache.enabled else None
    hold = hold_from_annotations(((deployment or {}).get("metadata") or {}).get("annotations"))
    scaled_to_zero = (
        hold is None
        and spec.autoscaling.enabled
        and spec.autoscaling.min_replicas == 0
        and deployment is not None
        and ((deployment.get("spec") or {}).get("replicas") == 0)
        and not live_pods
    )
    if deployment is None:
        workload = _condition(
            "WorkloadReady", False, "Creating", "the runtime Deployment does not exist yet", generation
        )
    elif hold is not None or scaled_to_zero:
        workload = _at_zero(spec, hold, generation, cache_now)
    elif ready_replicas >= 1:
        msg = f"{ready_replicas}/{dstatus.get('replicas', 0)} replicas ready"
        if problems:
            msg += f"; others: {problems[0][0]}: {problems[0][1]}"
        workload = _condition("WorkloadReady", True, "MinimumReplicasAvailable", msg, generation)
    elif waiting := startup_reason(cache_now, replica_phases, problems):
        workload = _condition("WorkloadReady", False, waiting[0], waiting[1], generation)
    elif not live_pods:
        workload = _condition("WorkloadReady", False, "NoReplicas", "no runtime pods exist", generation)
    else:
        workload = _condition(
            "WorkloadReady", False, "Starting", "replicas are starting (loading the model)", generation
        )
    subs = [workload]
    if refusal:
        subs.insert(0, _condition("Accepted", False, refusal[0], refusal[1], generation))

    if spec.autoscaling.enabled:
        active = _cond(hpa, "ScalingActive")
        if scaled_to_zero:  # an HPA whose target is at 0 reports ScalingDisabled: by design here
            subs.append(_condition("AutoscalerReady", True, "ScaledToZero", "resumes at 1 replica", generation))
        elif hpa is None:
            subs.append(_condition("AutoscalerReady", False, "Creating", "the HPA does not exist yet", generation))
        elif active is None:
            subs.append(_condition("AutoscalerReady", None, "Pending", "the HPA has not evaluated yet", generation))
        else:
            ok = active.get("status") == "True"
            subs.append(
                _condition("AutoscalerReady", ok, active.get("reason", ""), active.get("message", ""), generation)
            )

    failing = [c for c in subs if c["status"] != "True"]
    if failing:
        ready = _condition("Ready", False, failing[0]["reason"], failing[0]["message"], generation)
    else:
        ready = _condition("Ready", True, "Ready", f"serving at {service_url(name, namespace)}", generation)
    selector = ",".join(f"{k}={v}" for k, v in selector_for(name).items())
    replica_adapters: list[dict] = []
    if adapters is not None:
        replica_adapters, adapters_ready = adapter_status(adapter_paths(spec), adapters)
        if adapters_ready:
            subs.append(_condition("AdaptersReady", *adapters_ready, generation))
    return {
        "observedGeneration": generation,
        "modelName": spec.model.name or name,
        "replicas": dstatus.get("replicas", 0),
        "readyReplicas": ready_replicas,
        "scaledToZero": bool(scaled_to_zero),
        "url": service_url(name, namespace),
        "selector": selector,
        "conditions": [ready, *subs],
        "replicaAdapters": replica_adapters,
        "replicaStatuses": replica_phases,
        "progress": summary(cache_now, replica_phases),
        "cache": cache_now,  # None removes an earlier one from the status (a merge patch)
        "modelConfig": model_config_status(spec, cache[0], cache_pods or []),
    }


def merge_conditions(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = {c["type"]: c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c["type"])
        when = prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"] else None
        out.append({**c, "lastTransitionTime": when or _now()})
    return out
