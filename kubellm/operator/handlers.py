"""kopf wiring: desired state on create/update/resume, observed state (status) from a timer over
in-memory indexes of our children and pods, and drift repair from the children's watch events."""

from __future__ import annotations

import copy
import json
import logging

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from kubellm.operator.policy import Refused
from kubellm.operator.reconcile import CHILD_KINDS, CHILD_PLURALS, OPTIONAL_KINDS, Reconciler
from kubellm.operator.render import ISVC_LABEL, MANAGED_BY
from kubellm.operator.spec import GROUP, PLURAL, VERSION
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


@kopf.index("", "v1", "pods", labels=OURS)
def pod_index(namespace, labels, body, **_):
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
        changed = reconciler().reconcile(_snapshot(body))
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
    RECONCILES.labels("ok").inc()
    log.info("applied %s", ", ".join(changed), extra={"isvc": f"{namespace}/{name}"})


@kopf.on.delete(GROUP, VERSION, PLURAL)
def delete_children(body, namespace, name, **_):
    # kopf already holds a finalizer for the status timer; use it to remove the children at once
    _refusals.pop((namespace, name), None)
    try:
        deleted = reconciler().delete_children(_snapshot(body))
    except ApiException as e:
        raise kopf.TemporaryError(f"deleting children failed: {e.reason}", delay=5) from None
    log.info("deleted %s", ", ".join(deleted) or "nothing (already gone)", extra={"isvc": f"{namespace}/{name}"})


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
    **_,
):
    MANAGED.set(len(isvc_index))
    key = (namespace, name)
    refused = _refusals.get(key)
    new = compute_status(
        _snapshot(body),
        _first(deployment_index, key),
        _first(hpa_index, key),
        list(pod_index.get(key, [])),
        refusal=(refused.reason, refused.message) if refused else None,
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
