"""The operator's RBAC is exactly what its code uses: the kinds and verbs the Reconciler calls (recorded
against an in-memory API), the resources kopf watches for our handlers and indexes (its registry), and kopf's
own needs (events, status, peering, CRD discovery), compared with manifests/operator.yaml and
manifests/rbac-namespaced.yaml (and the chart's RBAC template). tests/cluster/test_operator_rbac.py runs the
operator under these rules on a real control plane."""

from __future__ import annotations

import pathlib

import kopf
import yaml

import kubellm.operator.handlers  # noqa: F401  (registers the handlers)
from kubellm.operator.reconcile import CHILD_KINDS, CHILD_PLURALS, POLICY_CONFIGMAP
from tests.support.recording_api import recording_reconciler

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESOURCE = {
    **CHILD_PLURALS,
    "InferenceService": "inferenceservices",
    "ConfigMap": "configmaps",
    "PodLog": "pods/log",
    "Pod": "pods",
    "Node": "nodes",
    "Secret": "secrets",
}
GROUP = {
    **{k: v.rpartition("/")[0] for k, v in CHILD_KINDS.items()},
    "InferenceService": "kubellm.io",
    "ConfigMap": "",
    "PodLog": "",
    "Pod": "",
    "Node": "",
    "Secret": "",
}


def reconciler_verbs() -> set[tuple[str, str, str]]:
    """Drive the Reconciler through everything it does and record what it asked of the API."""
    r, api = recording_reconciler()
    spec = {
        "model": {"uri": "hf://a/b", "cache": {"enabled": True}},
        "networkPolicy": {"enabled": True},
        "autoscaling": {"minReplicas": 2},
        "inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp"}},
        "adapters": [{"name": "a", "uri": "pvc://loras/a"}],  # the pods' admin key: a Secret
    }
    isvc = {"metadata": {"name": "m", "namespace": "ns", "uid": "u1"}, "spec": spec}
    api.isvc = isvc
    r.reconcile(isvc)  # create everything
    r.reconcile(isvc)  # update everything
    for kind in CHILD_KINDS:  # a hand edit repaired; one that apply cannot merge replaced
        api.store[(kind, "ns", "m")]["spec"] = {"edited": True}
        r.repair(isvc, kind)
        if kind == "Job":  # an edited Job is deleted and created again (its pod template is immutable)
            continue
        api.store[(kind, "ns", "m")]["spec"] = {"edited": True}
        api.reject_next_apply = True
        r.repair(isvc, kind)
    r.download_progress("ns", "m-abcde", "fetch-model")  # the status reads downloaders' progress from their logs
    r.reconcile({**isvc, "spec": {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}}})  # fewer kinds
    r.plan({**isvc, "spec": {"model": {"uri": "hf://a/b", "config": FIT_CONFIG}}})  # the fit check reads nodes
    r.delete_children(isvc)
    return {(GROUP[kind], RESOURCE[kind], verb) for kind, verb in api.calls}


FIT_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
    "intermediate_size": 128,
}
# cluster-scoped reads of the Reconciler: in namespaced mode a ClusterRole beside kopf's grants them (read only)
CLUSTER_SCOPED = {("", "nodes", "list")}


def kopf_verbs() -> set[tuple[str, str, str]]:
    """What kopf does for our handlers: list+watch every handled or indexed resource; patch the objects of
    change handlers (finalizer, progress annotations) and their status (timers write it); post events."""
    registry = kopf.get_default_registry()
    used = set()
    for handlers in (registry._indexing, registry._watching, registry._spawning, registry._changing):
        for h in handlers.get_all_handlers():
            used |= {(h.selector.group, h.selector.any_name, v) for v in ("list", "watch")}
    for h in registry._changing.get_all_handlers() + registry._spawning.get_all_handlers():
        used |= {
            (h.selector.group, h.selector.any_name, "patch"),
            (h.selector.group, "inferenceservices/status", "patch"),
        }
    return used | {("", "events", "create")}


# kopf's own, not visible in our code: CRD discovery (cluster-scoped), peering (one of the two per mode), and
# in namespaced mode the namespaces it follows (it lists them at the cluster scope: seen as 403s otherwise)
KOPF_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
KOPF_NAMESPACED_CLUSTER = KOPF_CLUSTER | {("", "namespaces", v) for v in ("list", "watch")} | CLUSTER_SCOPED
PEERING = {"cluster": "clusterkopfpeerings", "namespaced": "kopfpeerings"}


def needed(mode: str) -> set[tuple[str, str, str]]:
    peering = {("kopf.dev", PEERING[mode], v) for v in ("list", "watch", "patch")}
    scoped = CLUSTER_SCOPED if mode == "namespaced" else set()
    return (reconciler_verbs() | kopf_verbs() | peering) - {("", "configmaps", "get")} - scoped


def triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_recorded_verbs_cover_every_child_kind():
    verbs = reconciler_verbs()
    for kind in CHILD_KINDS:
        for verb in ("get", "create", "patch", "update", "delete"):
            if (kind, verb) == ("Job", "update"):
                continue  # never updated: replaced
            assert (GROUP[kind], RESOURCE[kind], verb) in verbs, (kind, verb)
    assert ("", "pods/log", "get") in verbs
    assert ("", "configmaps", "get") in verbs and ("kubellm.io", "inferenceservices", "get") in verbs
    assert ("", "nodes", "list") in verbs


def test_cluster_wide_rbac_is_what_the_code_uses():
    objs = docs(ROOT / "manifests/operator.yaml")
    role = next(d for d in objs if d["kind"] == "ClusterRole")
    assert triples(role["rules"]) == needed("cluster") | KOPF_CLUSTER
    policy = next(d for d in objs if d["kind"] == "Role")
    ns, _, name = POLICY_CONFIGMAP.partition("/")
    assert policy["metadata"]["namespace"] == ns
    assert policy["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get"]}
    ]
    bound = {d["roleRef"]["name"] for d in objs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    assert bound == {role["metadata"]["name"], policy["metadata"]["name"]}


def test_namespaced_rbac_creates_nothing_outside_the_watched_namespaces():
    objs = docs(ROOT / "manifests/rbac-namespaced.yaml")
    cluster_roles = [d for d in objs if d["kind"] == "ClusterRole"]
    assert [triples(c["rules"]) for c in cluster_roles] == [KOPF_NAMESPACED_CLUSTER]  # read-only, nothing else
    role = next(d for d in objs if d["kind"] == "Role")
    assert triples(role["rules"]) == needed("namespaced")


def test_the_chart_grants_the_same_rules():
    """Its template's rules blocks in order: all namespaces, or CRD discovery + a Role per watched namespace;
    then the policy ConfigMap's Role."""
    text = (ROOT / "charts/kubellm/templates/rbac.yaml").read_text()
    rules_blocks = [yaml.safe_load(block.split("---")[0]) for block in text.split("rules:")[1:]]
    found = [triples(b) for b in rules_blocks if isinstance(b, list)]
    assert found == [
        needed("cluster") | KOPF_CLUSTER,
        KOPF_NAMESPACED_CLUSTER,
        needed("namespaced"),
        {("", "configmaps", "get")},
    ]
