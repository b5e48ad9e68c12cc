"""The operator runs under exactly the shipped RBAC, as its ServiceAccount would in the cluster: all namespaces
under manifests/operator.yaml's ClusterRole, one namespace under manifests/rbac-namespaced.yaml's Role. An
InferenceService with every child kind (and LoRA adapters: the pods' admin key Secret) becomes Ready, drift is
repaired, deletion cleans up, and the operator logs no permission error."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml
from kubernetes import client, utils
from kubernetes.client.exceptions import ApiException

from tests.support.isvc import G, P, V, create_isvc, custom, wait_ready
from tests.support.kube import make_pvc, wait_for
from tests.support.operator import OperatorProcess

pytestmark = pytest.mark.cluster
ROOT = pathlib.Path(__file__).resolve().parents[2]
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def rbac_docs(path: str, namespace: str | None = None) -> list[dict]:
    text = (ROOT / path).read_text()
    if namespace:
        text = text.replace("namespace: team-a", f"namespace: {namespace}")
    return [d for d in yaml.safe_load_all(text) if d and d["kind"] in RBAC_KINDS]


def apply(docs: list[dict]) -> None:
    api = client.ApiClient()
    for d in docs:
        try:
            utils.create_from_dict(api, d)
        except utils.FailToCreateError as e:
            if any(x.status != 409 for x in e.api_exceptions):
                raise


def delete(docs: list[dict]) -> None:
    rbac = client.RbacAuthorizationV1Api()
    calls = {
        "ClusterRole": lambda name, ns: rbac.delete_cluster_role(name),
        "ClusterRoleBinding": lambda name, ns: rbac.delete_cluster_role_binding(name),
        "Role": rbac.delete_namespaced_role,
        "RoleBinding": rbac.delete_namespaced_role_binding,
    }
    for d in docs:
        if d["kind"] in calls:
            try:
                calls[d["kind"]](d["metadata"]["name"], d["metadata"].get("namespace"))
            except ApiException as e:
                if e.status != 404:
                    raise


def service_account_kubeconfig(cluster, tmp_path) -> pathlib.Path:
    """The operator's ServiceAccount (manifests/operator.yaml) and a kubeconfig with a token for it."""
    core = client.CoreV1Api()
    for body, create in (
        ({"metadata": {"name": "kubellm-system"}}, lambda b: core.create_namespace(b)),
        (
            {"metadata": {"name": "kubellm-operator"}},
            lambda b: core.create_namespaced_service_account("kubellm-system", b),
        ),
    ):
        try:
            create(body)
        except ApiException as e:
            if e.status != 409:
                raise
    token = core.create_namespaced_service_account_token(
        "kubellm-operator", "kubellm-system", {"spec": {"expirationSeconds": 3600}}
    ).status.token
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sa",
        "clusters": [
            {"name": "c", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.pki / "ca.crt")}}
        ],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }
    path = tmp_path / "operator-sa.kubeconfig"
    path.write_text(json.dumps(cfg))
    return path


def exercise(namespace: str) -> None:
    """Every child kind, status, events, drift repair, deletion."""
    make_pvc(namespace, "loras")
    spec = {
        "model": {"uri": "hf://a/b"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 3},  # HPA and PDB
        "networkPolicy": {"enabled": True},
        "adapters": [{"name": "a", "uri": "pvc://loras/a"}],  # the pods' admin key: a Secret, made and read
    }
    create_isvc(namespace, "rbac", spec)
    wait_ready(namespace, "rbac", timeout=90)
    core = client.CoreV1Api()
    assert core.read_namespaced_secret("rbac-admin-key", namespace).data["key"]
    core.delete_namespaced_service("rbac", namespace)
    wait_for("the Service repaired", lambda: core.list_namespaced_service(namespace).items)
    for kind in ("NetworkPolicy", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert wait_for(kind, lambda k=kind: listed(k, namespace))
    custom().delete_namespaced_custom_object(G, V, namespace, P, "rbac")
    wait_for(
        "every child deleted",
        lambda: not any(listed(k, namespace) for k in ("Deployment", "Service", "NetworkPolicy", "Secret")),
        timeout=60,
    )


def listed(kind: str, namespace: str) -> list:
    return {
        "Deployment": lambda: client.AppsV1Api().list_namespaced_deployment(namespace).items,
        "Service": lambda: client.CoreV1Api().list_namespaced_service(namespace).items,
        "Secret": lambda: [
            s for s in client.CoreV1Api().list_namespaced_secret(namespace).items if s.metadata.name == "rbac-admin-key"
        ],
        "NetworkPolicy": lambda: client.NetworkingV1Api().list_namespaced_network_policy(namespace).items,
        "PodDisruptionBudget": lambda: client.PolicyV1Api().list_namespaced_pod_disruption_budget(namespace).items,
        "HorizontalPodAutoscaler": lambda: (
            client.AutoscalingV2Api().list_namespaced_horizontal_pod_autoscaler(namespace).items
        ),
    }[kind]()


def no_permission_errors(op: OperatorProcess) -> None:
    lines = [json.loads(line) for line in op.logs().splitlines() if line.strip()]
    # RBAC's wording ("... is forbidden: User ... cannot list resource ..."), not a terminating namespace's 403
    denied = [line for line in lines if "cannot " in line["msg"] and "forbidden" in line["msg"]]
    assert not denied, denied[:3]


@pytest.mark.parametrize("mode", ["cluster-wide", "cluster-wide with peering", "namespaced"])
def test_the_operator_works_under_exactly_the_shipped_rbac(cluster, operator, namespace, tmp_path, kubectl, mode):
    kubeconfig = service_account_kubeconfig(cluster, tmp_path)
    docs = rbac_docs("manifests/operator.yaml")
    args: list[str] = []
    if mode == "cluster-wide with peering":  # the CRDs first, then the ClusterKopfPeering: apply until it takes
        peering = str(ROOT / "manifests/peering.yaml")
        wait_for("the peering objects", lambda: kubectl("apply", "-f", peering, check=False).returncode == 0)
        args = ["--peering=kubellm"]
    if mode == "namespaced":  # the policy Role of operator.yaml, the rest from rbac-namespaced.yaml
        docs = [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
        docs += rbac_docs("manifests/rbac-namespaced.yaml", namespace)
        args = [f"--namespace={namespace}"]
    apply(docs)
    operator.kill()
    scoped = OperatorProcess(kubeconfig, *args)
    try:
        scoped.start()
        exercise(namespace)
        if "peering" in mode:  # it registered itself (a patch of the ClusterKopfPeering)
            peers = custom().get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "kubellm")
            assert peers.get("status"), peers
        no_permission_errors(scoped)
    finally:
        scoped.stop()
        delete(docs)
        operator.start()
