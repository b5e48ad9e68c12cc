"""compute_status: the InferenceService's status from its children and pods, honestly. Pure (no I/O).

`Ready` aggregates the sub-conditions that apply (WorkloadReady always, AutoscalerReady when autoscaling is
on, Accepted when the operator refuses the spec: ChildConflict, PolicyViolation, InvalidRuntimeArgs,
ForbiddenEnv; or when the API server rejects a child: ApplyRejected); reasons say what the pods are actually
doing: InsufficientGPU, Unschedulable, ImagePullBackOff, CrashLoopBackOff, OOMKilled, StartupTimeout, …
"""

from __future__ import annotations

import datetime as dt

from kubellm.operator.render import selector_for, service_url
from kubellm.operator.spec import parse_spec

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


def compute_status(
    isvc: dict,
    deployment: dict | None,
    hpa: dict | None,
    pods: list[dict],
    now: dt.datetime | None = None,
    refusal: tuple[str, str] | None = None,
) -> dict:
    """`refusal` is why the operator does not apply the spec as written (reason, message): an `Accepted=False`
    condition, present only then, that Ready reports first (the children keep their last accepted state)."""
    now = now or dt.datetime.now(dt.UTC)
    meta = isvc["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation", 0)
    spec = parse_spec(isvc.get("spec") or {})
    dstatus = (deployment or {}).get("status") or {}
    ready_replicas = dstatus.get("readyReplicas", 0)
    live_pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]

    problems = [
        pp
        for p in live_pods
        if (pp := pod_problem(p, spec.resources.gpu_resource_name, spec.startup.timeout_seconds, now))
    ]
    scaled_to_zero = (
        spec.autoscaling.enabled
        and spec.autoscaling.min_replicas == 0
        and deployment is not None
        and ((deployment.get("spec") or {}).get("replicas") == 0)
        and not live_pods
    )
    if deployment is None:
        workload = _condition(
            "WorkloadReady", False, "Creating", "the runtime Deployment does not exist yet", generation
        )
    elif scaled_to_zero:
        workload = _condition(
            "WorkloadReady",
            False,
            "ScaledToZero",
            f"no replicas after {spec.autoscaling.idle_seconds} s without a request; kubellm router holds the next "
            "request and scales back to 1",
            generation,
        )
    elif ready_replicas >= 1:
        msg = f"{ready_replicas}/{dstatus.get('replicas', 0)} replicas ready"
        if problems:
            msg += f"; others: {problems[0][0]}: {problems[0][1]}"
        workload = _condition("WorkloadReady", True, "MinimumReplicasAvailable", msg, generation)
    elif problems:
        workload = _condition("WorkloadReady", False, problems[0][0], problems[0][1], generation)
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
    return {
        "observedGeneration": generation,
        "modelName": spec.model.name or name,
        "replicas": dstatus.get("replicas", 0),
        "readyReplicas": ready_replicas,
        "scaledToZero": bool(scaled_to_zero),
        "url": service_url(name, namespace),
        "selector": selector,
        "conditions": [ready, *subs],
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
