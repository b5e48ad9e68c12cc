"""The cluster side of routing on a real control plane: the InferencePool the operator renders validates against
the upstream Gateway API Inference Extension CRD (and the operator applies it), `minReplicas: 0` passes the
CRD's rules, and `kubellm router` finds a model at zero through the API and scales its Deployment 0 -> 1
through the scale subresource while it holds the request."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import httpx
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubellm.operator.reconcile import Reconciler
from kubellm.runtime.process import free_port
from tests.support.isvc import G, V, create_isvc, get_isvc
from tests.support.kube import wait_for
from tests.support.router import ROUTER_RULES
from tests.support.server import wait_http_ok

pytestmark = pytest.mark.cluster
POOL_CRD = pathlib.Path(__file__).resolve().parents[1] / "support/crds/inference.networking.k8s.io_inferencepools.yaml"
GROUP, VERSION, PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"


@pytest.fixture(scope="module")
def pool_crd(kubectl, crd_installed):
    kubectl("apply", "--server-side", "-f", str(POOL_CRD))
    ext = client.ApiextensionsV1Api()
    wait_for(
        "the InferencePool CRD to be established",
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions or []
        ),
    )


def test_the_operator_applies_an_inference_pool_the_upstream_crd_accepts(namespace, pool_crd):
    spec = {
        "model": {"uri": "hf://a/b"},
        "resources": {"gpus": 0},
        "inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp", "port": 9002}},
    }
    isvc = create_isvc(namespace, "pooled", spec)
    changed = Reconciler().reconcile(isvc).changed
    assert "InferencePool" in changed
    custom = client.CustomObjectsApi()
    pool = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "pooled")
    assert pool["metadata"]["ownerReferences"][0]["uid"] == isvc["metadata"]["uid"]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["selector"]["matchLabels"]["kubellm.io/inferenceservice"] == "pooled"
    assert pool["spec"]["endpointPickerRef"]["port"] == {"number": 9002}

    # the CRD's own rules run on what we send: without a port for a Service it refuses (so the above was checked)
    bad = {**pool, "metadata": {"name": "no-port"}}
    bad["spec"] = {**pool["spec"], "endpointPickerRef": {"name": "epp", "kind": "Service"}}
    with pytest.raises(ApiException) as e:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad, dry_run="All")
    assert e.value.status == 422 and "port is required" in e.value.body

    # turned off: the pool is deleted. Turned off in the API, not only in the dict handed to reconcile: the tier's
    # cluster-wide operator (started by earlier tests) reconciles this InferenceService too, and from a live spec
    # that still said enabled it re-created the pool between our delete and our read (the final CI of session 9)
    custom.patch_namespaced_custom_object(
        G, V, namespace, "inferenceservices", "pooled", {"spec": {"inferencePool": {"enabled": False}}}
    )
    isvc = get_isvc(namespace, "pooled")
    assert isvc["spec"]["inferencePool"]["enabled"] is False
    Reconciler().reconcile(isvc)  # deletes it, unless that operator already has

    def pool_gone() -> bool:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "pooled")
        except ApiException as e:
            assert e.status == 404
            return True
        return False

    wait_for("the InferencePool to be deleted", pool_gone, timeout=30)


def test_min_replicas_zero_is_accepted_and_negative_refused(namespace, crd_installed):
    ok = create_isvc(namespace, "zero", {"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": 0}})
    assert ok["spec"]["autoscaling"]["minReplicas"] == 0 and ok["spec"]["autoscaling"]["idleSeconds"] == 300
    with pytest.raises(ApiException) as e:
        create_isvc(namespace, "neg", {"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": -1}})
    assert "minReplicas must not be negative" in e.value.body


def router_kubeconfig(cluster, namespace: str, path: pathlib.Path) -> pathlib.Path:
    """A ServiceAccount bound to a Role of exactly the chart's router rules, and a kubeconfig with its token."""
    core, rbac = client.CoreV1Api(), client.RbacAuthorizationV1Api()
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "router"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "router"}, "rules": ROUTER_RULES})
    binding = {
        "metadata": {"name": "router"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "router"},
        "subjects": [{"kind": "ServiceAccount", "name": "router", "namespace": namespace}],
    }
    rbac.create_namespaced_role_binding(namespace, binding)
    token = core.create_namespaced_service_account_token(
        "router", namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    server = {"server": cluster.server, "certificate-authority": str(cluster.pki / "ca.crt")}
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sa",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }
    path.write_text(json.dumps(cfg))
    return path


def test_the_router_scales_a_model_at_zero_up_through_the_api(namespace, cluster, crd_installed, tmp_path):
    # no node matches: the new pod stays Pending, so the held request meets no pod (the fake nodes would make
    # a pod Ready at an address no test should send to)
    spec = {"model": {"uri": "hf://a/b", "name": "cold-model"}, "resources": {"gpus": 0}}
    spec |= {"autoscaling": {"minReplicas": 0, "idleSeconds": 30}, "scheduling": {"nodeSelector": {"none": "x"}}}
    isvc = create_isvc(namespace, "cold", spec)
    Reconciler().reconcile(isvc)
    apps = client.AppsV1Api()
    assert client.AutoscalingV2Api().read_namespaced_horizontal_pod_autoscaler("cold", namespace).spec.min_replicas == 1
    apps.patch_namespaced_deployment_scale("cold", namespace, {"spec": {"replicas": 0}})  # as after an idle window

    port = free_port()
    log_path = f"/tmp/kubellm-router-cluster-{port}.log"
    # under the chart's router RBAC, nothing more: a call it lacks would fail discovery or the scale-up
    env = {**os.environ, "KUBECONFIG": str(router_kubeconfig(cluster, namespace, tmp_path / "router.kubeconfig"))}
    cmd = [sys.executable, "-m", "kubellm.cli", "router", "--namespace", namespace, "--host", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd + ["--port", str(port), "--hold-timeout-s", "3"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http_ok("kubellm router", url + "/ready", proc, log_path, 60)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["cold-model"]
        body = {"model": "cold-model", "messages": [{"role": "user", "content": "hi"}]}
        held = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        # held, the Deployment asked for 1 replica, and a clean 503 + Retry-After when no pod became Ready in time
        assert held.status_code == 503 and held.headers["Retry-After"], held.text
        assert apps.read_namespaced_deployment_scale("cold", namespace).spec.replicas == 1
        assert "scaling from zero" in pathlib.Path(log_path).read_text()
        unknown = httpx.post(url + "/v1/chat/completions", json={**body, "model": "nope"}, timeout=10)
        assert unknown.status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_discovery_reads_ready_pods_from_endpoint_slices(namespace, crd_installed):
    import asyncio

    from kubellm.router.discovery import KubernetesDiscovery

    isvc = create_isvc(
        namespace, "warm", {"model": {"uri": "hf://a/b", "name": "warm-model"}, "resources": {"gpus": 0}}
    )
    Reconciler().reconcile(isvc)
    discovery = KubernetesDiscovery(namespace, client.ApiClient())

    def ready_addresses() -> tuple[str, ...]:
        pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector="kubellm.io/inferenceservice=warm")
        ready = [
            p.status.pod_ip
            for p in pods.items
            if p.status.pod_ip
            and p.metadata.deletion_timestamp is None
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return tuple(f"http://{ip}:8000" for ip in sorted(ready))

    def agreeing_routes():
        """The router's view once it equals the Ready pods' addresses (the tier's cluster-wide operator also
        reconciles this InferenceService, so a pod may be replaced while the test reads)."""
        routes = asyncio.run(discovery.routes())
        model = routes.get("warm-model")
        return model is not None and model.endpoints and model.endpoints == ready_addresses() and routes

    routes = wait_for("the Ready pod's address in the router's view", agreeing_routes)
    assert not routes["warm-model"].scales_to_zero


def test_the_router_keeps_pods_deletion_cost_under_its_rbac(namespace, cluster, crd_installed, tmp_path):
    isvc = create_isvc(namespace, "costly", {"model": {"uri": "hf://a/b"}, "resources": {"gpus": 0}})
    Reconciler().reconcile(isvc)
    core = client.CoreV1Api()

    def ready_pod():
        pods = core.list_namespaced_pod(namespace, label_selector="kubellm.io/inferenceservice=costly").items
        return next((p for p in pods if p.status.pod_ip and p.metadata.deletion_timestamp is None), None)

    wait_for("a Ready pod", ready_pod)
    port = free_port()
    log_path = f"/tmp/kubellm-router-cluster-{port}.log"
    env = {**os.environ, "KUBECONFIG": str(router_kubeconfig(cluster, namespace, tmp_path / "router.kubeconfig"))}
    cmd = [sys.executable, "-m", "kubellm.cli", "router", "--namespace", namespace, "--host", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http_ok("kubellm router", f"http://127.0.0.1:{port}/ready", proc, log_path, 60)

        def cost_of_a_ready_pod():  # read again each time: the session's operator may have replaced the pod
            now = ready_pod()
            return now and (now.metadata.annotations or {}).get("controller.kubernetes.io/pod-deletion-cost")

        annotated = wait_for("a Ready pod's deletion cost", cost_of_a_ready_pod, timeout=60)
        # its load (0 here: nothing sent; the kwok pod's address does not answer a scrape, or on a host that also
        # runs the node tier may reach one of its pods, hence no exact value)
        assert int(annotated) >= 0
        assert "deletion cost not set" not in pathlib.Path(log_path).read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
