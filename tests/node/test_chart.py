"""The Helm chart (charts/kubellm): `helm lint`, and no drift from the kubectl install path — with default
values the chart renders the same objects as crds/ + manifests/operator.yaml (+ manifests/peering.yaml's
CRDs). helm is built from its Go module once and cached (tests/support/build-node-bins.sh --helm)."""

from __future__ import annotations

import pathlib
import subprocess

import pytest
import yaml

from tests.support.router import ROUTER_RULES

pytestmark = pytest.mark.node
ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/kubellm"


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "tests/support/build-node-bins.sh"), "--helm"], check=True, capture_output=True, text=True
    ).stdout
    return str(pathlib.Path(out.split()[-1]) / "helm")


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def template(helm: str, *args: str) -> list[dict]:
    out = subprocess.run(
        [helm, "template", "kubellm", str(CHART), "--namespace", "kubellm-system", "--kube-version", "1.36.3", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return docs(out)


def test_helm_lint(helm):
    for values in ([], ["--set", "peering.enabled=true,replicas=2"]):
        p = subprocess.run([helm, "lint", "--strict", str(CHART), *values], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


def test_chart_renders_what_the_manifests_install(helm):
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in template(helm)}
    manifests = {
        (d["kind"], d["metadata"]["name"]): d
        for d in docs((ROOT / "manifests/operator.yaml").read_text())
        if d["kind"] != "Namespace"  # the chart installs into the release namespace (--create-namespace)
    }
    assert rendered.keys() == manifests.keys()
    for key, want in manifests.items():
        assert rendered[key] == want, key


def test_chart_crds_are_the_projects(helm):
    assert (CHART / "crds/inferenceservices.kubellm.io.yaml").read_text() == (
        ROOT / "crds/inferenceservices.kubellm.io.yaml"
    ).read_text()
    peering_crds = [d for d in docs((ROOT / "manifests/peering.yaml").read_text()) if d["kind"].endswith("Definition")]
    assert docs((CHART / "crds/kopfpeerings.kopf.dev.yaml").read_text()) == peering_crds


def test_chart_peering_option(helm):
    objs = template(helm, "--set", "peering.enabled=true,replicas=2")
    (dep,) = [d for d in objs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2
    assert "--peering=kubellm" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [d["metadata"]["name"] for d in objs if d["kind"] == "ClusterKopfPeering"] == ["kubellm"]


def test_the_router_option_deploys_kubellm_router_with_only_what_it_calls(helm):
    """router.enabled: a Deployment running `kubellm router` from the operator image, its Service, and RBAC for
    exactly the calls kubellm/router/discovery.py makes (list InferenceServices and EndpointSlices, get/patch
    deployments/scale, patch pods) — cluster-wide by default, a Role where router.watchNamespace names one namespace."""
    assert not [d for d in template(helm) if d["metadata"]["name"] == "kubellm-router"]  # off by default
    for values, role_kind, scope_arg in (
        (["--set", "router.enabled=true"], "ClusterRole", "--all-namespaces"),
        (["--set", "router.enabled=true,router.watchNamespace=ml"], "Role", "--namespace=ml"),
    ):
        objs = {(d["kind"], d["metadata"]["name"]): d for d in template(helm, *values)}
        deploy = objs[("Deployment", "kubellm-router")]
        container = deploy["spec"]["template"]["spec"]["containers"][0]
        assert (
            container["image"]
            == objs[("Deployment", "kubellm-operator")]["spec"]["template"]["spec"]["containers"][0]["image"]
        )
        assert container["args"][:2] == ["router", "--port=8080"] and scope_arg in container["args"]
        assert deploy["spec"]["replicas"] == 1  # held requests and idle windows live in one process
        assert objs[(role_kind, "kubellm-router")]["rules"] == ROUTER_RULES
        assert objs[("Service", "kubellm-router")]["spec"]["ports"][0]["targetPort"] == "http"
    p = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--set", "router.enabled=true"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_tracing_option_reaches_the_router_and_the_operator(helm):
    """tracing.otlpTracesEndpoint: the router's flag, and the operator's setting (which puts the standard
    OpenTelemetry variables into every runtime pod: tests/unit/test_operator_render.py); nothing when empty."""

    def containers(*values):
        objs = {d["metadata"]["name"]: d for d in template(helm, "--set", ",".join(["router.enabled=true", *values]))}
        return [objs[n]["spec"]["template"]["spec"]["containers"][0] for n in ("kubellm-router", "kubellm-operator")]

    router, operator = containers()
    assert not [a for a in router["args"] if "otlp" in a] and not [e for e in operator["env"] if "OTLP" in e["name"]]
    router, operator = containers("tracing.otlpTracesEndpoint=http://otel-collector.monitoring:4318")
    assert "--otlp-traces-endpoint=http://otel-collector.monitoring:4318" in router["args"]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert env["KUBELLM_OTLP_TRACES_ENDPOINT"] == "http://otel-collector.monitoring:4318"
