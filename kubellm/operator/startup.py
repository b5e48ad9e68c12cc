"""Start-up progress, pure: each replica's phase (WaitingForCache, Downloading x%, LoadingWeights, WarmingUp —
Loading while the runtime has not said which —, Ready, or what is wrong) and the model cache's (Pending,
Downloading x%, Ready, Failed), from the pods, the cache Job and claim, the downloaders' last progress lines and
the runtimes' start-up phase lines (read from their logs by the operator: pods have no API token)."""

from __future__ import annotations

import re

from kubellm.downloads import DownloadProgress
from kubellm.operator.render import FETCH_CONTAINER, WAIT_CONTAINER


def _cond_true(obj: dict | None, kind: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _running_init(pod: dict) -> str | None:
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if "running" in (cs.get("state") or {}):
            return cs.get("name")
    return None


def replica_phase(
    pod: dict, problem: tuple[str, str] | None, progress: DownloadProgress | None, started: str | None = None
) -> dict:
    """{pod, phase[, progress][, message]} for one runtime pod; `started`: the start-up phase its runtime's log
    last named (kubellm.downloads:STARTUP_PHASES)."""
    name = (pod.get("metadata") or {}).get("name", "")
    if _cond_true(pod, "Ready"):
        return {"pod": name, "phase": "Ready"}
    if problem:
        return {"pod": name, "phase": problem[0], "message": problem[1][:300]}
    running_init = _running_init(pod)
    if running_init == WAIT_CONTAINER:
        return {"pod": name, "phase": "WaitingForCache"}
    if running_init == FETCH_CONTAINER:
        out = {"pod": name, "phase": "Downloading"}
        if progress is not None:
            out["progress"] = progress.summary()
        return out
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if any("running" in (cs.get("state") or {}) for cs in statuses):
        return {"pod": name, "phase": started or "Loading"}  # the runtime has not said which yet: "Loading"
    return {"pod": name, "phase": "Pending"}


def cache_status(job: dict | None, claim: dict | None, downloads: dict[str, DownloadProgress]) -> dict:
    """{phase, message[, progress, percent]} of the model cache (the claim and the Job that fills it); the Job's
    progress is in `downloads` under the Job's name."""
    progress = downloads.get(((job or {}).get("metadata") or {}).get("name", ""))
    if claim is not None and (claim.get("status") or {}).get("phase") == "Pending":
        name = claim["metadata"]["name"]
        modes = (claim.get("spec") or {}).get("accessModes") or []
        hint = (
            " (ReadWriteMany needs a StorageClass that provides it; cache.accessMode ReadWriteOnce keeps the Job and "
            "the replicas on one node)"
            if "ReadWriteMany" in modes
            else ""
        )
        return {"phase": "Pending", "message": f"the cache claim {name} is not bound to a volume yet{hint}"}
    if job is None:
        return {"phase": "Pending", "message": "the cache Job does not exist yet"}
    if _cond_true(job, "Complete") or ((job.get("status") or {}).get("succeeded") or 0) >= 1:
        out = {"phase": "Ready", "message": "the model is in the cache"}
        if progress is not None and progress.done:
            out["message"] += f": {progress.summary()}"
        return out
    failed = _cond_true(job, "Failed")
    if failed:
        return {"phase": "Failed", "message": f"the cache Job failed: {failed.get('message') or failed.get('reason')}"}
    out = {"phase": "Downloading", "message": "the cache Job is downloading the model"}
    if progress is not None:
        out["progress"] = progress.summary()
        out["message"] += f": {progress.summary()}"
        if progress.percent is not None:
            out["percent"] = round(progress.percent, 1)
    return out


def startup_reason(cache: dict | None, replicas: list[dict], problems: list[tuple[str, str]]) -> tuple[str, str] | None:
    """Why no replica serves yet, (reason, message) for WorkloadReady: the model cache first while it is not
    ready (the replicas wait for it: their own state says little), then a replica's problem, then a replica's
    own download."""
    if cache is not None and cache["phase"] != "Ready":
        reason = {"Downloading": "DownloadingModel", "Failed": "ModelCacheFailed"}.get(
            cache["phase"], "ModelCachePending"
        )
        return reason, cache["message"]
    if problems:
        return problems[0]
    for r in replicas:
        if r["phase"] == "Downloading":
            detail = f": {r['progress']}" if r.get("progress") else ""
            return "DownloadingModel", f"pod {r['pod']} is downloading the model{detail}"
    return None


def summary(cache: dict | None, replicas: list[dict]) -> str:
    """One line for `kubectl get kisvc` (the Progress column)."""
    parts = []
    if cache is not None and cache["phase"] != "Ready":
        parts.append(f"cache {cache['phase'].lower()}" + (f" {cache['progress']}" if cache.get("progress") else ""))
    counts: dict[str, int] = {}
    for r in replicas:
        counts[r["phase"]] = counts.get(r["phase"], 0) + 1
    ready = counts.pop("Ready", 0)
    if replicas:
        parts.append(f"{ready}/{len(replicas)} ready")
    for phase, n in counts.items():
        detail = next((r.get("progress") for r in replicas if r["phase"] == phase and r.get("progress")), None)
        parts.append(f"{n} {_words(phase)}" + (f" {detail}" if detail else ""))
    return "; ".join(parts)


def _words(phase: str) -> str:
    """ "WarmingUp" → "warming up": the Progress column is read by people."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", phase).lower()
