"""kopf wiring: desired state on create/update/resume, observed state (status) from a timer over
in-memory indexes of our children and pods, and drift repair from the children's watch events."""

from __future__ import annotations

import asyncio
import copy
import json
import logging

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from kubellm.downloads import DownloadProgress
from kubellm.operator import fit_plan
from kubellm.operator.adapters import SYNC_INTERVAL_S, PodAdapters, is_ready, sync_pods
from kubellm.operator.policy import Refused
from kubellm.operator.reconcile import CHILD_KINDS, CHILD_PLURALS, OPTIONAL_KINDS, Reconciler
from kubellm.operator.render import (
    CACHE_LABELS,
    FETCH_CONTAINER,
    ISVC_LABEL,
    MANAGED_BY,
    RUNTIME_CONTAINER,
    adapter_paths,
    lora_slots,
)
from kubellm.operator.spec import GROUP, PLURAL, VERSION, parse_spec
from kubellm.operator.status import compute_status, merge_conditions

log = logging.getLogger("kubellm.operator")
STATUS_INTERVAL_S = 2.0
OURS = {"app.kubernetes.io/managed-by": MANAGED_BY}

RECONCILES = Counter("kubellm_operator_reconciles", "Reconciliations of InferenceServices.", ["result"])
REPAIRS = Counter("kubellm_operator_drift_repairs", "Children restored after a hand edit or deletion.", ["kind"])
STATUS_UPDATES = Counter("kubellm_operator_status_updates", "Status patches written.")
MANAGED = Gauge("kubellm_operator_inferenceservices", "InferenceServices this operator manages.")

_reconciler: Reconciler | None = None
# why the operator does not act on an InferenceService as written: (namespace, name) → Refused; set and
# cleared by every reconcile (a restart re-reconciles on resume), read by the status timer
_refusals: dict[tuple[str, str], Refused] = {}
REFUSED_RETRY_S = 30  # a policy edit or a conflicting object's removal is picked up this soon
# each InferenceService's Ready pods and the LoRA adapters they hold, as the adapter sync last left them (read by
# the status timer); absent for a service without LoRA
_adapters: dict[tuple[str, str], dict[str, PodAdapters]] = {}
# the key each service's pods take for their adapter endpoints (Reconciler.admin_key), read once, again after a
# pod refused it
_admin_keys: dict[tuple[str, str], str] = {}
# the downloaders' last progress lines, read from their logs by a timer: (namespace, name) → {pod name (the cache
# Job's: the Job's name) → DownloadProgress}; read by the status timer
_downloads: dict[tuple[str, str], dict[str, DownloadProgress]] = {}
# each starting runtime pod's phase (LoadingWeights, WarmingUp), read from its log by the same timer: (namespace,
# name) → {pod name → phase}; read by the status timer
_phases: dict[tuple[str, str], dict[str, str]] = {}
PROGRESS_INTERVAL_S = 5.0
FIT_RECHECK_S = 60  # a model held at 0 by the pre-start fit check: a node with a bigger GPU is noticed this soon


def reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:  # outside a cluster: KUBECONFIG / ~/.kube/config
            config.load_kube_config()
        _reconciler = Reconciler()
    return _reconciler


def _snapshot(body) -> dict:
    return copy.deepcopy(dict(body))


def _first(store, key):
    for value in store.get(key, []):
        return value
    return None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.persistence.finalizer = "kubellm.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubellm.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubellm.io")
    settings.posting.level = logging.WARNING  # kopf's own log chatter stays out of Events; ours use kopf.event
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 16
    reconciler()


# ------------------------------------------------------------------ indexes (no API calls in the status loop)
@kopf.index(GROUP, VERSION, PLURAL)
def isvc_index(namespace, name, body, **_):
    return {(namespace, name): _snapshot(body)}


@kopf.index("apps", "v1", "deployments", labels=OURS)
def deployment_index(namespace, labels, body, **_):
    return {(namespace, labels.get(ISVC_LABEL)): _snapshot(body)}


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=OURS)
def hpa_index(namespace, labels, body, **_):
    return {(namespace, labels.get(ISVC_LABEL)): _snapshot(body)}


@kopf.index("", "v1", "pods", labels={**OURS, "app.kubernetes.io/name": "kubellm-runtime"})
def pod_index(namespace, labels, body, **_):
    return {(namespace, labels.get(ISVC_LABEL)): _snapshot(body)}


# the model cache: its claim, its Job and the Job's pod (whose log has the download's progress)
@kopf.index("", "v1", "persistentvolumeclaims", labels=OURS)
def claim_index(namespace, labels, body, **_):
    return {(namespace, labels.get(ISVC_LABEL)): _snapshot(body)}


@kopf.index("batch", "v1", "jobs", labels=OURS)
def job_index(namespace, labels, body, **_):
    return {(namespace, labels.get(ISVC_LABEL)): _snapshot(body)}


@kopf.index("", "v1", "pods", labels={**OURS, "app.kubernetes.io/name": CACHE_LABELS["app.kubernetes.io/name"]})
def cache_pod_index(namespace, labels, body, **_):
    return {(namespace, labels.get(ISVC_LABEL)): _snapshot(body)}


def _api_message(e: ApiException) -> str:
    """The API server's own sentence from an error response (a Status object), else the HTTP reason."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.reason)


# ------------------------------------------------------------------ desired state
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
def reconcile(body, namespace, name, **_):
    try:
        changed, hold = reconciler().reconcile(_snapshot(body))
    except Refused as e:
        RECONCILES.labels("refused").inc()
        before = _refusals.get((namespace, name))
        if before is None or before.args != e.args:  # say it once, not at every retry
            kopf.event(body, type="Warning", reason=e.reason, message=e.message[:1000])
            log.warning("refused: %s", e, extra={"isvc": f"{namespace}/{name}"})
        _refusals[(namespace, name)] = e
        raise kopf.TemporaryError(str(e), delay=REFUSED_RETRY_S) from None
    except ValidationError as e:  # the CRD's schema should have stopped this; say why and do not retry
        RECONCILES.labels("invalid").inc()
        kopf.event(body, type="Warning", reason="InvalidSpec", message=str(e)[:1000])
        raise kopf.PermanentError(f"invalid spec: {e}") from None
    except ApiException as e:
        RECONCILES.labels("error").inc()
        if e.status in (400, 403, 422):  # admission or validation said no: the status says why (not "Creating")
            rejected = Refused("ApplyRejected", f"the API server rejected a child: {e.status} {_api_message(e)}")
            before = _refusals.get((namespace, name))
            if before is None or before.args != rejected.args:
                kopf.event(body, type="Warning", reason=rejected.reason, message=rejected.message[:1000])
                log.warning("%s", rejected.message, extra={"isvc": f"{namespace}/{name}"})
            _refusals[(namespace, name)] = rejected
            raise kopf.TemporaryError(f"apply rejected: {e.reason}", delay=30) from None
        raise kopf.TemporaryError(f"apply failed: {e.reason}", delay=5) from None
    _refusals.pop((namespace, name), None)
    RECONCILES.labels("ok" if hold is None else "held").inc()
    log.info("applied %s", ", ".join(changed), extra={"isvc": f"{namespace}/{name}"})
    if hold is not None:  # the status timer's Ready=False InsufficientGPUMemory event carries the numbers
        log.warning("replicas held at 0: %s", hold.message, extra={"isvc": f"{namespace}/{name}"})


@kopf.on.delete(GROUP, VERSION, PLURAL)
def delete_children(body, namespace, name, **_):
    # kopf already holds a finalizer for the status timer; use it to remove the children at once
    _refusals.pop((namespace, name), None)
    _adapters.pop((namespace, name), None)
    _admin_keys.pop((namespace, name), None)
    _downloads.pop((namespace, name), None)
    _phases.pop((namespace, name), None)
    try:
        deleted = reconciler().delete_children(_snapshot(body))
    except ApiException as e:
        raise kopf.TemporaryError(f"deleting children failed: {e.reason}", delay=5) from None
    log.info("deleted %s", ", ".join(deleted) or "nothing (already gone)", extra={"isvc": f"{namespace}/{name}"})


# ------------------------------------------------------------------ the fit check's holds
def _hold(deployment: dict | None) -> fit_plan.Hold | None:
    return fit_plan.hold_from_annotations(((deployment or {}).get("metadata") or {}).get("annotations"))


def stop_restart_loop(body: dict, deployment: dict | None, pods: list[dict]) -> None:
    """A runtime pod refused to start (the model does not fit): hold the replicas at 0 for this generation of
    the spec instead of letting the kubelet restart it (fit_plan.hold_for), once."""
    refusal = fit_plan.runtime_refusal(pods)
    if refusal is None or ((deployment or {}).get("status") or {}).get("readyReplicas", 0) > 0:
        return  # nothing refused, or some replicas serve (the refusing pod's node is smaller: its status says so)
    held = _hold(deployment)
    if held is not None and held.source == fit_plan.RUNTIME and held.generation == body["metadata"].get("generation"):
        return
    where = {"isvc": f"{body['metadata']['namespace']}/{body['metadata']['name']}"}
    try:
        _, hold = reconciler().reconcile(_snapshot(body), refusal=refusal)
    except (Refused, ApiException) as e:  # the reconcile handler reports it; the next status tick retries this
        log.warning("could not hold the replicas of a model that does not fit: %s", e, extra=where)
        return
    if hold is not None:
        log.warning("replicas held at 0: %s", hold.message, extra=where)


def release_after_cache(body: dict, deployment: dict | None, job: dict | None, cache_pods: list[dict]) -> None:
    """Replicas waiting at 0 for the cache Job's report: once the Job has completed, run the fit check now (it
    holds them with the numbers, or releases them) rather than at the next re-check."""
    held = _hold(deployment)
    if held is None or held.reason != fit_plan.WAITING_REASON:
        return
    try:
        uri = parse_spec(body.get("spec") or {}).model.uri
    except ValidationError:
        return
    if not fit_plan.cache_report(job, cache_pods, uri).complete:
        return
    where = {"isvc": f"{body['metadata']['namespace']}/{body['metadata']['name']}"}
    try:
        _, hold = reconciler().reconcile(body)
    except (Refused, ApiException) as e:  # the reconcile handler reports it; the next status tick retries this
        log.warning("could not run the fit check after the model cache completed: %s", e, extra=where)
        return
    log.info("model cache complete: %s", hold.message if hold else "the model fits; replicas released", extra=where)


@kopf.timer(GROUP, VERSION, PLURAL, interval=FIT_RECHECK_S, initial_delay=FIT_RECHECK_S, sharp=False)
def recheck_fit(body, namespace, name, deployment_index: kopf.Index, **_):
    """A pre-start hold (or a wait for the cache Job's report) depends on the nodes (their GPU memory labels):
    look again now and then."""
    held = _hold(_first(deployment_index, (namespace, name)))
    if held is None or held.source != fit_plan.OPERATOR:
        return
    try:
        reconciler().reconcile(_snapshot(body))
    except (Refused, ApiException) as e:
        log.info("fit re-check deferred: %s", e, extra={"isvc": f"{namespace}/{name}"})


# ------------------------------------------------------------------ observed state
@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_INTERVAL_S, sharp=False)
def refresh_status(
    body,
    namespace,
    name,
    status,
    patch,
    deployment_index: kopf.Index,
    hpa_index: kopf.Index,
    pod_index: kopf.Index,
    isvc_index: kopf.Index,
    job_index: kopf.Index,
    claim_index: kopf.Index,
    cache_pod_index: kopf.Index,
    **_,
):
    MANAGED.set(len(isvc_index))
    key = (namespace, name)
    refused = _refusals.get(key)
    deployment, pods = _first(deployment_index, key), list(pod_index.get(key, []))
    job, cache_pods = _first(job_index, key), list(cache_pod_index.get(key, []))
    stop_restart_loop(_snapshot(body), deployment, pods)
    release_after_cache(_snapshot(body), deployment, job, cache_pods)
    new = compute_status(
        _snapshot(body),
        deployment,
        _first(hpa_index, key),
        pods,
        refusal=(refused.reason, refused.message) if refused else None,
        adapters=_adapters.get(key),
        cache=(job, _first(claim_index, key)),
        downloads=_downloads.get(key),
        cache_pods=cache_pods,
        phases=_phases.get(key),
    )
    old_conditions = status.get("conditions") or []
    new["conditions"] = merge_conditions(old_conditions, new["conditions"])
    current = {k: status.get(k) for k in new}
    if current == new:
        return
    patch.status.update(new)
    STATUS_UPDATES.inc()
    before = next((c for c in old_conditions if c.get("type") == "Ready"), {})
    ready = new["conditions"][0]
    if (before.get("status"), before.get("reason")) != (ready["status"], ready["reason"]):
        kopf.event(
            body,
            type="Normal" if ready["status"] == "True" else "Warning",
            reason=ready["reason"],
            message=ready["message"][:1000],
        )


# ------------------------------------------------------------------ LoRA adapters onto Ready pods
@kopf.timer(GROUP, VERSION, PLURAL, interval=SYNC_INTERVAL_S, sharp=False)
async def sync_adapters(body, namespace, name, pod_index: kopf.Index, **_):
    """Load spec.adapters onto every Ready pod and unload the others (kubellm/operator/adapters.py); idempotent:
    a pod that holds what it should gets one GET /v1/models per round."""
    key = (namespace, name)
    try:
        spec = parse_spec(body.get("spec") or {})
    except ValidationError:
        return
    if not lora_slots(spec):
        _adapters.pop(key, None)
        _admin_keys.pop(key, None)
        return
    if key not in _admin_keys:
        try:
            _admin_keys[key] = await asyncio.to_thread(reconciler().admin_key, _snapshot(body))
        except (Refused, ApiException) as e:  # the reconcile handler reports a conflict; try again next round
            log.warning("no admin key for the adapter sync: %s", e, extra={"isvc": f"{namespace}/{name}"})
            return
    before = _adapters.get(key, {})
    now = await sync_pods(list(pod_index.get(key, [])), adapter_paths(spec), _admin_keys[key], before)
    if any(p.denied for p in now.values()):
        _admin_keys.pop(key, None)
    for pod, state in now.items():
        for adapter, failure in state.failures.items():
            if before.get(pod) is None or adapter not in before[pod].failures:  # say it once
                message = f"adapter {adapter} not loaded on pod {pod}: {failure.message}"
                kopf.event(body, type="Warning", reason="AdapterLoadFailed", message=message[:1000])
                log.warning("%s", message, extra={"isvc": f"{namespace}/{name}"})
    _adapters[key] = now


def _running(pod: dict, container: str, init: bool) -> bool:
    key = "initContainerStatuses" if init else "containerStatuses"
    return any(
        cs.get("name") == container and "running" in (cs.get("state") or {})
        for cs in (pod.get("status") or {}).get(key) or []
    )


@kopf.timer(GROUP, VERSION, PLURAL, interval=PROGRESS_INTERVAL_S, sharp=False)
def read_download_progress(
    namespace, name, pod_index: kopf.Index, cache_pod_index: kopf.Index, job_index: kopf.Index, **_
):
    """The progress of every download under way for this InferenceService: the cache Job's pod (and its last
    line once, after it finished) and the replicas' own fetch-model init containers; and the start-up phase of
    each runtime container that runs but is not Ready yet (loading the weights or warming up)."""
    key = (namespace, name)
    before = _downloads.get(key, {})
    now: dict[str, DownloadProgress] = {}
    job = _first(job_index, key)
    if job is not None:
        job_name = job["metadata"]["name"]
        kept = before.get(job_name)
        for pod in cache_pod_index.get(key, []):
            if (pod.get("metadata") or {}).get("labels", {}).get("job-name") != job_name:
                continue  # a replaced Job's pod, on its way out
            if _running(pod, FETCH_CONTAINER, init=False) or (
                (pod.get("status") or {}).get("phase") == "Succeeded" and not (kept and kept.done)
            ):
                kept = reconciler().download_progress(namespace, pod["metadata"]["name"], FETCH_CONTAINER) or kept
        if kept is not None:
            now[job_name] = kept
    phases: dict[str, str] = {}
    for pod in pod_index.get(key, []):
        pod_name = pod["metadata"]["name"]
        if _running(pod, FETCH_CONTAINER, init=True):
            progress = reconciler().download_progress(namespace, pod_name, FETCH_CONTAINER)
            if progress is not None:
                now[pod_name] = progress
        elif _running(pod, RUNTIME_CONTAINER, init=False) and not is_ready(pod):
            if phase := reconciler().startup_phase(namespace, pod_name):
                phases[pod_name] = phase
    for store, found in ((_downloads, now), (_phases, phases)):
        if found:
            store[key] = found
        else:
            store.pop(key, None)


# ------------------------------------------------------------------ drift repair
def _repair(kind: str, event, namespace, labels, isvc_index: kopf.Index) -> None:
    isvc = _first(isvc_index, (namespace, labels.get(ISVC_LABEL)))
    if isvc is None or isvc["metadata"].get("deletionTimestamp"):
        return  # the owner is gone: the garbage collector removes the rest
    where = {"isvc": f"{namespace}/{isvc['metadata']['name']}"}
    try:
        repaired = reconciler().repair(isvc, kind)
    except Refused as e:  # the reconcile handler reports it (condition, event) and retries
        log.info("not repairing %s: %s", kind, e, extra=where)
        return
    except ApiException as e:
        log.warning("could not repair %s: %s", kind, e.reason, extra=where)
        return
    if repaired:
        REPAIRS.labels(kind).inc()
        what = "deleted" if event.get("type") == "DELETED" else "changed"
        kopf.event(
            isvc, type="Normal", reason="DriftRepaired", message=f"{kind} was {what} outside the operator; restored"
        )


def _watch_child(kind: str):
    group, _, version = CHILD_KINDS[kind].rpartition("/")
    plural = CHILD_PLURALS[kind]

    @kopf.on.event(group, version, plural, labels=OURS, id=f"repair-{plural}")
    def on_child_event(event, namespace, labels, isvc_index: kopf.Index, **_):
        _repair(kind, event, namespace, labels, isvc_index)

    return on_child_event


for _kind in CHILD_KINDS:
    if _kind not in OPTIONAL_KINDS:
        _watch_child(_kind)
