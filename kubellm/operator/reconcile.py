"""Reconciler: make the cluster hold exactly the rendered children of an InferenceService (server-side
apply with our field manager), delete children it should no longer have, and repair drift.

It never takes over an object it does not own: a child name held by anything without this InferenceService's
uid among its owner references is a `ChildConflict`. A new child is created (which fails on a name taken in the
meantime, where an apply would merge into it); an update and a delete carry the uid they expect.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from typing import NamedTuple

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from kubellm.downloads import DownloadProgress, last_progress, last_startup_phase
from kubellm.operator import fit_plan
from kubellm.operator.policy import Policy, Refused, admit, policy_from_configmap
from kubellm.operator.render import (
    CACHE_LABELS,
    ISVC_LABEL,
    MANAGED_BY,
    OPERATOR_NAMESPACE,
    RUNTIME_CONTAINER,
    admin_key_secret,
    lora_slots,
    render,
    render_admin_key_secret,
)
from kubellm.operator.spec import GROUP, PLURAL, VERSION, parse_spec

log = logging.getLogger("kubellm.operator")
FIELD_MANAGER = "kubellm-operator"
# the cluster admin's allow-list: namespace/name of a ConfigMap (manifests/policy.yaml), by default
# `kubellm-policy` in the operator's own namespace; "" turns it off
POLICY_CONFIGMAP = os.environ.get("KUBELLM_POLICY_CONFIGMAP", f"{OPERATOR_NAMESPACE}/kubellm-policy")
CHILD_KINDS = {  # kind → apiVersion
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "InferencePool": "inference.networking.k8s.io/v1",
    "PersistentVolumeClaim": "v1",  # model.cache: the claim and the Job that fills it
    "Job": "batch/v1",
}
# kinds whose CRD a cluster may lack (the Gateway API Inference Extension): absent, there is nothing of ours to
# read or delete, and asking for one is a refusal that says what to install; no drift watch (kopf would need them)
OPTIONAL_KINDS = {"InferencePool"}
MISSING_KIND_RECHECK_SECONDS = 60
LOG_TAIL_LINES = 5  # a downloader's warning may follow its last progress line
STARTUP_LOG_LINES = 40  # a starting runtime's own log lines (the KV cache's size, warnings) follow its phase line
CHILD_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "InferencePool": "inferencepools",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Job": "jobs",
}


def overlay(live, desired):
    """live with desired written over it; lists are replaced whole (a hand-edited list is not merged)."""
    if isinstance(desired, dict) and isinstance(live, dict):
        return {**live, **{k: overlay(live.get(k), v) for k, v in desired.items()}}
    return desired


def is_subset(desired, live) -> bool:
    """Does the live object still contain everything we asked for? (The API adds defaults; we ignore those.)"""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(map(is_subset, desired, live))
    return desired == live or str(desired) == str(live)


class Reconciled(NamedTuple):
    changed: list[str]  # the kinds applied, "-Kind" for those deleted
    hold: fit_plan.Hold | None  # replicas held at 0: the model does not fit


def owned_by(live: dict | None, isvc: dict) -> bool:
    owners = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(o.get("uid") == isvc["metadata"]["uid"] for o in owners)


def ours(live: dict | None, isvc: dict) -> bool:
    """Owned by this InferenceService, or a model cache claim kept (reclaim Retain, no owner reference) for an
    InferenceService of this name: that one takes it up again."""
    if owned_by(live, isvc):
        return True
    meta = (live or {}).get("metadata") or {}
    labels = meta.get("labels") or {}
    return (
        (live or {}).get("kind") == "PersistentVolumeClaim"
        and not meta.get("ownerReferences")
        and labels.get(ISVC_LABEL) == isvc["metadata"]["name"]
        and all(labels.get(k) == v for k, v in CACHE_LABELS.items())
        and labels.get("app.kubernetes.io/managed-by") == MANAGED_BY
    )


class Reconciler:
    def __init__(self, api_client: client.ApiClient | None = None, policy_configmap: str = POLICY_CONFIGMAP):
        api_client = api_client or client.ApiClient()
        self.dynamic = DynamicClient(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.policy_configmap = policy_configmap
        self._resources: dict[str, object] = {}
        self._missing: dict[str, float] = {}  # optional kind -> when its absence was last seen

    def policy(self) -> Policy:
        """The admin's allow-list, read afresh (an edit applies at the next reconcile); none when absent."""
        if not self.policy_configmap:
            return Policy()
        namespace, _, name = self.policy_configmap.partition("/")
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return Policy()
            raise Refused(
                "PolicyUnavailable", f"cannot read the policy ConfigMap {self.policy_configmap}: {e.reason}"
            ) from None
        return policy_from_configmap(cm.data, f"ConfigMap {self.policy_configmap}")

    def nodes(self) -> list[dict] | None:
        """Every node's name, labels and allocatable resources (the fit check's candidates); None where the
        operator may not read nodes (namespaced RBAC without the node reader)."""
        try:
            items = self.core.list_node().items
        except ApiException as e:
            if e.status == 403:
                return None
            raise
        return [self.core.api_client.sanitize_for_serialization(n) for n in items]

    def plan(self, isvc: dict, refusal: dict | None = None) -> tuple[list[dict], fit_plan.Hold | None]:
        """The children to apply and whether the replicas are held at 0 (fit_plan.hold_for: `refusal` is a
        runtime pod's, just seen), once the spec passes the operator's checks (raises Refused otherwise)."""
        spec = parse_spec(isvc.get("spec") or {})
        admit(spec, self.policy())
        meta = isvc["metadata"]
        live = self.read("Deployment", meta["name"], meta["namespace"])
        nodes = self.nodes() if fit_plan.needs_nodes(spec) else None
        cache = self.cache_report(isvc, spec.model.uri) if fit_plan.needs_cache_report(spec) else None
        try:
            hold = fit_plan.hold_for(
                spec, meta.get("generation", 0), live if owned_by(live, isvc) else None, nodes, refusal, cache
            )
        except fit_plan.InvalidModelConfig as e:
            raise Refused("InvalidModelConfig", str(e)) from None
        return render(isvc, hold.annotation() if hold else None), hold

    def cache_report(self, isvc: dict, uri: str) -> fit_plan.CacheReport:
        """What this InferenceService's model cache Job reported (fit_plan.cache_report), read afresh: the Job
        and its pods (their termination messages)."""
        meta = isvc["metadata"]
        job = self.read("Job", meta["name"], meta["namespace"])
        if not owned_by(job, isvc):
            return fit_plan.CacheReport(False)
        selector = f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}"
        items = self.core.list_namespaced_pod(meta["namespace"], label_selector=selector).items
        pods = [self.core.api_client.sanitize_for_serialization(p) for p in items]
        return fit_plan.cache_report(job, pods, uri)

    def desired(self, isvc: dict) -> list[dict]:
        return self.plan(isvc)[0]

    def _resource(self, kind: str):
        if kind not in self._resources:
            self._resources[kind] = self.dynamic.resources.get(api_version=CHILD_KINDS[kind], kind=kind)
        return self._resources[kind]

    def available(self, kind: str) -> bool:
        """Does the cluster serve this kind? Always for the core kinds; an optional kind's absence is looked up
        again after a minute (its CRD may be installed meanwhile)."""
        if kind not in OPTIONAL_KINDS or kind in self._resources:
            return True
        if time.monotonic() - self._missing.get(kind, -MISSING_KIND_RECHECK_SECONDS) < MISSING_KIND_RECHECK_SECONDS:
            return False
        try:
            self._resource(kind)
        except ResourceNotFoundError:
            self._missing[kind] = time.monotonic()
            return False
        return True

    def apply(self, manifest: dict, live: dict | None, isvc: dict) -> dict:
        """Write one child that is ours (`live`) or absent (None); never anyone else's."""
        kind, meta = manifest["kind"], manifest["metadata"]
        if live is not None and not ours(live, isvc):
            raise conflict([(kind, meta)])
        if kind == "Job" and live is not None and not is_subset(manifest["spec"], live.get("spec")):
            self._replace_job(live)  # a Job's pod template is immutable: a new URI, image or secret is a new Job
            live = None
        try:
            if live is None:
                return self._create(manifest)
            # the live uid as a precondition: an object that replaced ours since we read it fails the write
            return self._server_side_apply({**manifest, "metadata": {**meta, "uid": live["metadata"]["uid"]}})
        except ApiException as e:
            if e.status in (409, 422):
                now = self.read(kind, meta["name"], meta["namespace"])
                if now is not None and not ours(now, isvc):
                    raise conflict([(kind, meta)]) from None
                if live is None and now is not None and e.status == 409:
                    # created for this same InferenceService since we looked (another replica's handler that had
                    # not yet paused, a retried handler): ours, so apply over it
                    return self._server_side_apply({**manifest, "metadata": {**meta, "uid": now["metadata"]["uid"]}})
            raise

    def _replace_job(self, live: dict) -> None:
        """Delete an outdated Job of ours now (its pods follow in the background), so that a new one is created."""
        meta = live["metadata"]
        try:
            self._resource("Job").delete(
                name=meta["name"],
                namespace=meta["namespace"],
                body={"preconditions": {"uid": meta["uid"]}, "propagationPolicy": "Background"},
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def _create(self, manifest: dict) -> dict:
        """Create, which fails (409) if the name was taken since we looked: never an apply that would merge into
        a stranger's object. Then our fields go to our apply manager, as if server-side apply had created the
        object, so that a field we later stop applying is removed rather than left behind."""
        resource, meta = self._resource(manifest["kind"]), manifest["metadata"]
        created = resource.create(body=manifest, namespace=meta["namespace"], field_manager=FIELD_MANAGER).to_dict()
        for _ in range(3):  # a controller may write (status) in between: the test ops then fail; read again
            live = resource.get(name=meta["name"], namespace=meta["namespace"]).to_dict()
            ops = _update_entry_to_apply(live["metadata"].get("managedFields") or [])
            if not ops:
                break
            try:
                resource.patch(
                    body=ops,
                    name=meta["name"],
                    namespace=meta["namespace"],
                    content_type="application/json-patch+json",
                    field_manager=FIELD_MANAGER,
                )
                break
            except ApiException as e:
                if e.status != 422:
                    raise
        return created

    def _server_side_apply(self, manifest: dict) -> dict:
        meta = manifest["metadata"]
        return (
            self._resource(manifest["kind"])
            .server_side_apply(
                body=manifest,
                name=meta["name"],
                namespace=meta["namespace"],
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
            .to_dict()
        )

    def read(self, kind: str, name: str, namespace: str) -> dict | None:
        if not self.available(kind):
            return None
        try:
            return self._resource(kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _delete_if_ours(self, kind: str, isvc: dict) -> bool:
        meta = isvc["metadata"]
        live = self.read(kind, meta["name"], meta["namespace"])
        if not owned_by(live, isvc):
            return False
        # the uid precondition: never an object that replaced ours since we read it; Background, since a Job's
        # default is to orphan its pods (which would hold the cache claim forever)
        body = {"preconditions": {"uid": live["metadata"]["uid"]}, "propagationPolicy": "Background"}
        try:
            self._resource(kind).delete(name=meta["name"], namespace=meta["namespace"], body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        return True

    def reconcile(self, isvc: dict, refusal: dict | None = None) -> Reconciled:
        """Apply every rendered child and delete the kinds no longer rendered; returns what changed and the
        hold, if any. Raises Refused, touching nothing, when the spec fails a check or a child's name is taken by
        a stranger. `refusal`: a runtime pod's fit refusal (fit_plan.runtime_refusal), which holds the replicas."""
        children, hold = self.plan(isvc, refusal)
        missing = [c["kind"] for c in children if not self.available(c["kind"])]
        if missing:
            raise Refused(
                f"{missing[0]}Unavailable",
                f"this cluster does not serve {missing[0]} ({CHILD_KINDS[missing[0]]}): install the Gateway API "
                "Inference Extension CRDs, or turn inferencePool.enabled off",
            )
        live = {c["kind"]: self.read(c["kind"], c["metadata"]["name"], c["metadata"]["namespace"]) for c in children}
        taken = [c for c in children if live[c["kind"]] is not None and not ours(live[c["kind"]], isvc)]
        if taken:
            raise conflict([(c["kind"], c["metadata"]) for c in taken])
        changed = []
        with_lora = bool(lora_slots(parse_spec(isvc.get("spec") or {})))
        if with_lora:
            self.admin_key(isvc)  # before the Deployment, whose pods mount it
        for child in children:
            self.apply(child, live[child["kind"]], isvc)
            changed.append(child["kind"])
        for kind in set(CHILD_KINDS) - {c["kind"] for c in children}:
            if self._delete_if_ours(kind, isvc):
                changed.append(f"-{kind}")
        if not with_lora and self._delete_admin_key_if_ours(isvc):
            changed.append("-Secret")
        return Reconciled(changed, hold)

    def _read_admin_key(self, isvc: dict) -> dict | None:
        meta = isvc["metadata"]
        try:
            live = self.core.read_namespaced_secret(admin_key_secret(meta["name"]), meta["namespace"])
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return self.core.api_client.sanitize_for_serialization(live)

    def admin_key(self, isvc: dict) -> str:
        """The key this service's pods take for their adapter endpoints, from its Secret, made with a random key
        when absent (after a hand deletion too: the pods' mounted file follows). Raises a ChildConflict when the
        name is someone else's Secret."""
        live = self._read_admin_key(isvc)
        if live is None:
            key = secrets.token_urlsafe(32)
            try:
                self.core.create_namespaced_secret(isvc["metadata"]["namespace"], render_admin_key_secret(isvc, key))
                return key
            except ApiException as e:
                live = self._read_admin_key(isvc) if e.status == 409 else None  # made meanwhile (another handler)
                if live is None:
                    raise
        if not owned_by(live, isvc):
            raise conflict([("Secret", live["metadata"])])
        return base64.b64decode((live.get("data") or {}).get("key", "")).decode()

    def _delete_admin_key_if_ours(self, isvc: dict) -> bool:
        live = self._read_admin_key(isvc)
        if not owned_by(live, isvc):
            return False
        meta = live["metadata"]
        try:
            self.core.delete_namespaced_secret(
                meta["name"], meta["namespace"], body={"preconditions": {"uid": meta["uid"]}}
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        return True

    def download_progress(self, namespace: str, pod: str, container: str) -> DownloadProgress | None:
        """The last progress line a downloader printed (pods cannot write to the API: the operator reads their
        log); None when it printed none yet or the log is gone."""
        try:
            text = self.core.read_namespaced_pod_log(pod, namespace, container=container, tail_lines=LOG_TAIL_LINES)
        except ApiException as e:  # not started yet, removed meanwhile, a node that serves no logs: no news
            log.debug("no log from %s/%s: %s", namespace, pod, e.reason)
            return None
        return last_progress(text or "")

    def startup_phase(self, namespace: str, pod: str) -> str | None:
        """The start-up phase a runtime pod's log last named (kubellm.downloads:last_startup_phase); None when
        it named none yet or the log cannot be read."""
        try:
            text = self.core.read_namespaced_pod_log(
                pod, namespace, container=RUNTIME_CONTAINER, tail_lines=STARTUP_LOG_LINES
            )
        except ApiException as e:
            log.debug("no log from %s/%s: %s", namespace, pod, e.reason)
            return None
        return last_startup_phase(text or "")

    def owner_exists(self, isvc: dict) -> bool:
        """Is this very InferenceService (same uid) still there? Our cache of it may lag its deletion."""
        meta = isvc["metadata"]
        try:
            live = self.custom.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return live["metadata"]["uid"] == meta["uid"] and not live["metadata"].get("deletionTimestamp")

    def delete_children(self, isvc: dict) -> list[str]:
        """Delete every child now, rather than waiting for the garbage collector (which may not know a
        freshly installed CRD yet, or may be lagging)."""
        deleted = [kind for kind in CHILD_KINDS if self._delete_if_ours(kind, isvc)]
        return deleted + ["Secret"] * self._delete_admin_key_if_ours(isvc)

    def repair(self, isvc: dict, kind: str) -> bool:
        """Restore one child if it was deleted or edited by hand; True when something was repaired."""
        desired = next((c for c in self.desired(isvc) if c["kind"] == kind), None)
        meta = isvc["metadata"]
        if desired is None:
            return self._delete_if_ours(kind, isvc)
        live = self.read(kind, meta["name"], meta["namespace"])
        if (
            live is not None
            and is_subset(desired["spec"], live.get("spec"))
            and is_subset(desired["metadata"]["labels"], live["metadata"].get("labels"))
        ):
            return False
        if not self.owner_exists(isvc):  # the garbage collector is removing it: do not resurrect children
            return False
        try:
            self.apply(desired, live, isvc)
        except ApiException as e:
            # e.g. a list-map key edited by hand (a Service port number): applying our entry next to the
            # edited one is invalid, so write the whole object back instead
            if e.status != 422 or live is None:
                raise
            self._resource(kind).replace(body=overlay(live, desired), namespace=meta["namespace"])
        return True


def _update_entry_to_apply(entries: list[dict]) -> list[dict]:
    """A JSON patch turning our create's managedFields entry (operation Update) into an Apply entry."""
    for i, m in enumerate(entries):
        if (m.get("manager"), m.get("operation"), m.get("subresource")) == (FIELD_MANAGER, "Update", None):
            at = f"/metadata/managedFields/{i}"
            return [
                {"op": "test", "path": f"{at}/manager", "value": FIELD_MANAGER},
                {"op": "test", "path": f"{at}/operation", "value": "Update"},
                {"op": "replace", "path": f"{at}/operation", "value": "Apply"},
            ]
    return []


def conflict(children: list[tuple[str, dict]]) -> Refused:
    """A ChildConflict naming every (kind, metadata) whose name is held by an object this service does not own."""
    names = ", ".join(f"{kind} {meta['namespace']}/{meta['name']}" for kind, meta in children)
    return Refused(
        "ChildConflict",
        f"{names} already exists and is not owned by this InferenceService: the operator leaves it alone "
        "(delete or rename it, or choose another name for the InferenceService)",
    )
