"""Reconciler: make the cluster hold exactly the rendered children of an InferenceService (server-side
apply with our field manager), delete children it should no longer have, and repair drift."""

from __future__ import annotations

import logging

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from kubellm.operator.render import render
from kubellm.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("kubellm.operator")
FIELD_MANAGER = "kubellm-operator"
CHILD_KINDS = {  # kind → apiVersion
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
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


class Reconciler:
    def __init__(self, api_client: client.ApiClient | None = None):
        api_client = api_client or client.ApiClient()
        self.dynamic = DynamicClient(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._resources: dict[str, object] = {}

    def _resource(self, kind: str):
        if kind not in self._resources:
            self._resources[kind] = self.dynamic.resources.get(api_version=CHILD_KINDS[kind], kind=kind)
        return self._resources[kind]

    def apply(self, manifest: dict) -> dict:
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
        try:
            return self._resource(kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _delete_if_ours(self, kind: str, isvc: dict) -> bool:
        meta = isvc["metadata"]
        live = self.read(kind, meta["name"], meta["namespace"])
        owners = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == meta["uid"] for o in owners):
            return False
        try:
            self._resource(kind).delete(name=meta["name"], namespace=meta["namespace"])
        except ApiException as e:
            if e.status != 404:
                raise
        return True

    def reconcile(self, isvc: dict) -> list[str]:
        """Apply every rendered child and delete the kinds no longer rendered; returns what changed."""
        children = render(isvc)
        changed = []
        for child in children:
            self.apply(child)
            changed.append(child["kind"])
        for kind in set(CHILD_KINDS) - {c["kind"] for c in children}:
            if self._delete_if_ours(kind, isvc):
                changed.append(f"-{kind}")
        return changed

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
        return [kind for kind in CHILD_KINDS if self._delete_if_ours(kind, isvc)]

    def repair(self, isvc: dict, kind: str) -> bool:
        """Restore one child if it was deleted or edited by hand; True when something was repaired."""
        desired = next((c for c in render(isvc) if c["kind"] == kind), None)
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
            self.apply(desired)
        except ApiException as e:
            # e.g. a list-map key edited by hand (a Service port number): applying our entry next to the
            # edited one is invalid, so write the whole object back instead
            if e.status != 422 or live is None:
                raise
            self._resource(kind).replace(body=overlay(live, desired), namespace=meta["namespace"])
        return True
