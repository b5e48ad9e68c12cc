"""What a CR may not do, on a real control plane: take over an object it does not own (ChildConflict, and the
victim survives the CR's deletion), get past the operator's own checks (runtime args, the admin's allow-list),
get past the admission policy of manifests/policy.yaml; rendered pods pass Pod Security "restricted"; the
operator's log lines are JSON naming the InferenceService."""

from __future__ import annotations

import copy
import json
import pathlib
import uuid

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubellm.operator.policy import Refused
from kubellm.operator.reconcile import Reconciler
from kubellm.operator.render import render
from tests.support.isvc import G, P, V, condition, create_isvc, custom, get_isvc
from tests.support.kube import wait_for
from tests.support.rendered import scanned_specs

pytestmark = pytest.mark.cluster
ROOT = pathlib.Path(__file__).resolve().parents[2]


def accepted(ns: str, name: str, reason: str) -> dict:
    return wait_for(
        f"{name}: Accepted=False {reason}",
        lambda: (o := get_isvc(ns, name)) and condition(o, "Accepted").get("reason") == reason and o,
        timeout=30,
    )


def untouched(before: client.V1Service, after: client.V1Service) -> None:
    assert after.metadata.uid == before.metadata.uid
    assert after.metadata.resource_version == before.metadata.resource_version
    assert not after.metadata.owner_references
    assert after.spec.selector == before.spec.selector and after.spec.ports[0].port == before.spec.ports[0].port


def test_a_child_name_held_by_a_stranger_is_never_taken_over(operator, namespace, kubectl):
    core = client.CoreV1Api()
    victim = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "shop", "labels": {"app": "shop"}},
            "spec": {"selector": {"app": "shop"}, "ports": [{"name": "web", "port": 8080}]},
        },
    )
    create_isvc(namespace, "shop", {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}})
    obj = accepted(namespace, "shop", "ChildConflict")
    cond, ready = condition(obj, "Accepted"), condition(obj)
    assert cond["status"] == "False" and f"Service {namespace}/shop already exists" in cond["message"]
    assert (ready["status"], ready["reason"]) == ("False", "ChildConflict")
    untouched(victim, core.read_namespaced_service("shop", namespace))
    assert not client.AppsV1Api().list_namespaced_deployment(namespace).items  # refused whole: nothing applied
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e["reason"] == "ChildConflict" and e["involvedObject"]["name"] == "shop" for e in events)

    # the uid precondition: an object that appears between our read and our write is not adopted either
    isvc = get_isvc(namespace, "shop")
    service = next(c for c in render(isvc) if c["kind"] == "Service")
    with pytest.raises(Refused) as e:
        Reconciler().apply(service, None, isvc)
    assert e.value.reason == "ChildConflict"
    untouched(victim, core.read_namespaced_service("shop", namespace))

    # deleting the InferenceService leaves the victim alone
    custom().delete_namespaced_custom_object(G, V, namespace, P, "shop")
    wait_for(
        "the InferenceService gone", lambda: not custom().list_namespaced_custom_object(G, V, namespace, P)["items"]
    )
    untouched(victim, core.read_namespaced_service("shop", namespace))

    # the operator's log lines are JSON, and the refusal names the InferenceService
    lines = [json.loads(line) for line in operator.logs().splitlines() if line.strip()]
    assert any(
        (line.get("namespace"), line.get("name")) == (namespace, "shop") and "ChildConflict" in line["msg"]
        for line in lines
    )


def test_what_admission_cannot_parse_the_operator_refuses(operator, namespace):
    """A flag value CEL cannot judge (`--seed x`) and a stray positional: the serve parser refuses them."""
    create_isvc(namespace, "args", {"model": {"uri": "hf://a/b"}, "runtime": {"extraArgs": ["--seed", "x"]}})
    obj = accepted(namespace, "args", "InvalidRuntimeArgs")
    assert "--seed" in condition(obj, "Accepted")["message"]
    assert not client.AppsV1Api().list_namespaced_deployment(namespace).items
    # fixed by the user → accepted, the condition goes away
    custom().patch_namespaced_custom_object(
        G, V, namespace, P, "args", {"spec": {"runtime": {"extraArgs": ["--seed", "3"]}}}
    )
    # kopf runs the delayed handler once its retry delay (30 s) is over, even when the spec changed sooner
    wait_for("Accepted cleared", lambda: not condition(get_isvc(namespace, "args"), "Accepted"), timeout=75)
    dep = client.AppsV1Api().read_namespaced_deployment("args", namespace)
    assert dep.spec.template.spec.containers[0].args[-2:] == ["--seed", "3"]


@pytest.fixture
def policy_configmap():
    """manifests/policy.yaml's ConfigMap where the test operator reads it (kubellm-system/kubellm-policy)."""
    core = client.CoreV1Api()
    try:
        core.create_namespace({"metadata": {"name": "kubellm-system"}})
    except ApiException as e:
        if e.status != 409:
            raise
    cm = next(d for d in yaml.safe_load_all((ROOT / "manifests/policy.yaml").read_text()) if d["kind"] == "ConfigMap")
    core.create_namespaced_config_map("kubellm-system", cm)
    try:
        yield cm
    finally:
        core.delete_namespaced_config_map(cm["metadata"]["name"], "kubellm-system")


def test_the_operator_enforces_the_admins_allow_list(operator, namespace, policy_configmap):
    spec = {
        "model": {"uri": "hf://a/b"},
        "scheduling": {"priorityClassName": "system-node-critical", "tolerations": [{"operator": "Exists"}]},
    }
    create_isvc(namespace, "greedy", spec)
    message = condition(accepted(namespace, "greedy", "PolicyViolation"), "Accepted")["message"]
    assert "system-node-critical" in message and "allowedTolerationKeys" in message
    assert not client.AppsV1Api().list_namespaced_deployment(namespace).items
    create_isvc(namespace, "modest", {"model": {"uri": "hf://a/b"}, "scheduling": {"runtimeClassName": "nvidia"}})
    wait_for("modest's Deployment", lambda: client.AppsV1Api().list_namespaced_deployment(namespace).items)


HOSTILE = [
    ({"runtime": {"image": "docker.io/evil/miner:1"}}, "runtime.image docker.io/evil/miner:1 is not allowed"),
    ({"scheduling": {"priorityClassName": "system-node-critical"}}, "(allowedPriorityClasses: [])"),
    ({"scheduling": {"runtimeClassName": "kata"}}, "scheduling.runtimeClassName kata is not allowed"),
    ({"scheduling": {"tolerations": [{"operator": "Exists"}]}}, "scheduling.tolerations key (none) is not allowed"),
    ({"scheduling": {"tolerations": [{"key": "node-role.kubernetes.io/control-plane"}]}}, "allowedTolerationKeys"),
    ({"scheduling": {"nodeSelector": {"kubernetes.io/hostname": "n1"}}}, "key kubernetes.io/hostname is not allowed"),
    (
        {"resources": {"gpuResourceName": "example.com/fpga"}},
        "(allowedGpuResourceNames: [nvidia.com/gpu, amd.com/gpu])",
    ),
]


@pytest.fixture
def admission_policy(crd_installed, namespace):
    """manifests/policy.yaml's ValidatingAdmissionPolicy as shipped, its binding narrowed to the test namespace
    (other tests keep creating what they like)."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "manifests/policy.yaml").read_text())}
    adm = client.AdmissionregistrationV1Api()
    vap = docs["ValidatingAdmissionPolicy"]
    binding = copy.deepcopy(docs["ValidatingAdmissionPolicyBinding"])
    binding["metadata"]["name"] = f"kubellm-test-{uuid.uuid4().hex[:6]}"
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    }
    adm.create_validating_admission_policy(vap)
    adm.create_validating_admission_policy_binding(binding)
    try:
        yield vap
    finally:
        adm.delete_validating_admission_policy_binding(binding["metadata"]["name"])
        adm.delete_validating_admission_policy(vap["metadata"]["name"])


def refusal(ns: str, name: str, spec: dict) -> str | None:
    try:
        create_isvc(ns, name, spec)
    except ApiException as e:
        return f"{e.status} {json.loads(e.body)['message']}"
    custom().delete_namespaced_custom_object(G, V, ns, P, name)
    return None


def test_the_admission_policy_refuses_what_the_allow_list_does_not_allow(admission_policy, namespace):
    base = {"model": {"uri": "hf://a/b"}}
    wait_for(  # the policy takes effect once the apiserver has compiled it
        "the admission policy in force",
        lambda: (
            "is not allowed" in (refusal(namespace, "probe", {**base, "runtime": {"image": "docker.io/x/y:1"}}) or "")
        ),
        timeout=30,
    )
    for i, (extra, message) in enumerate(HOSTILE):
        got = refusal(namespace, f"hostile-{i}", {**base, **extra})
        assert got and got.startswith("403 ") and message in got, (extra, got)
    for path in sorted((ROOT / "manifests/examples").glob("*.yaml")):  # what we ship passes what we ship
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "InferenceService":
                assert refusal(namespace, doc["metadata"]["name"], doc["spec"]) is None, path
    allowed = {"image": "ghcr.io/kubellm/kubellm-runtime:0.2.0"}
    gpu_term = {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "Exists"}]}
    scheduling = {
        "runtimeClassName": "nvidia",
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [gpu_term]}},
            "podAntiAffinity": {},
        },
    }
    assert refusal(namespace, "ok", {**base, "runtime": allowed, "scheduling": scheduling}) is None


def test_rendered_pods_pass_pod_security_restricted(cluster, namespace):
    """The apiserver's own Pod Security admission (upstream's evaluator) in enforce=restricted mode judges a pod
    made from every rendered Deployment: every example's and a hostile CR's."""
    core, sched, node = client.CoreV1Api(), client.SchedulingV1Api(), client.NodeV1Api()
    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    sched.create_priority_class({"metadata": {"name": "kubellm-test-high"}, "value": 1000})
    node.create_runtime_class({"metadata": {"name": "kubellm-test-rc"}, "handler": "runc"})
    try:
        specs = scanned_specs()
        privileged = {"containers": [{"name": "x", "image": "x", "securityContext": {"privileged": True}}]}
        with pytest.raises(ApiException) as e:  # the namespace does enforce
            core.create_namespaced_pod(namespace, {"metadata": {"name": "bad"}, "spec": privileged}, dry_run="All")
        assert e.value.status == 403 and "restricted" in e.value.body
        for name, spec in specs.items():
            isvc = {"metadata": {"name": name, "namespace": namespace, "uid": "u"}, "spec": spec}
            template = render(isvc)[0]["spec"]["template"]
            pod = {"metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}
            core.create_namespaced_pod(namespace, pod, dry_run="All")  # raises 403 with the violations
    finally:
        sched.delete_priority_class("kubellm-test-high")
        node.delete_runtime_class("kubellm-test-rc")


@pytest.fixture
def deployments_denied(crd_installed, namespace):
    """A ValidatingAdmissionPolicy (an admin's, not ours) that denies every Deployment in the test namespace."""
    adm = client.AdmissionregistrationV1Api()
    name = f"kubellm-test-deny-{uuid.uuid4().hex[:6]}"
    rules = [
        {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}
    ]
    adm.create_validating_admission_policy(
        {
            "metadata": {"name": name},
            "spec": {
                "matchConstraints": {"resourceRules": rules},
                "validations": [{"expression": "false", "message": "no Deployments in this namespace"}],
            },
        }
    )
    adm.create_validating_admission_policy_binding(
        {
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
            },
        }
    )
    probe = {
        "metadata": {"name": "probe"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
        },
    }

    def in_force():
        try:
            client.AppsV1Api().create_namespaced_deployment(namespace, probe, dry_run="All")
        except ApiException as e:
            return "no Deployments in this namespace" in str(e.body)
        return False

    wait_for("the deny policy in force", in_force, timeout=30)
    try:
        yield name
    finally:
        adm.delete_validating_admission_policy_binding(name)
        adm.delete_validating_admission_policy(name)


def test_a_child_the_api_server_rejects_is_named_in_the_status(operator, namespace, deployments_denied):
    """Not "Creating" forever: Accepted=False ApplyRejected with the API server's own message, and Ready says it."""
    create_isvc(namespace, "denied", {"model": {"uri": "hf://a/b"}})
    obj = accepted(namespace, "denied", "ApplyRejected")
    assert "no Deployments in this namespace" in condition(obj, "Accepted")["message"]
    assert condition(obj)["reason"] == "ApplyRejected"
