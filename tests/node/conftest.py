"""Node-tier fixtures: the test control plane with one real node (containerd, kubelet, kube-proxy), the
project's images built with podman and imported, the operator installed as users install it, models on a
local PersistentVolume. If this machine cannot run containers the session fails with the reason, never skips."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from tests.support.node_k8s import make_namespace, operator_manifest, wait_deployment_ready

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """(cluster, node, step times). Fails (not skips) when the host cannot run real pods."""
    from tests.support.real_node import start_real_cluster

    try:
        cluster, node, times = start_real_cluster(tmp_path_factory.mktemp("node"))
    except Exception as e:  # a setup error is a failure of this tier, with the reason
        pytest.fail(f"the node tier cannot run real pods on this machine: {e}", pytrace=False)
    try:
        yield cluster, node, times
    finally:
        node.stop()
        cluster.stop()


@pytest.fixture(scope="session")
def node(real):
    return real[1]


@pytest.fixture(scope="session")
def kubectl(real):
    node = real[1]

    def run(*args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        p = node.kubectl(*args, check=False, input=input, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr}")
        return p

    return run


@pytest.fixture(scope="session")
def operator_installed(kubectl, node):
    """The kubectl install path of the README: CRDs, then manifests/operator.yaml (local image names)."""
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/inferenceservices.kubellm.io", "--timeout=60s")
    kubectl("apply", "-f", "-", input=operator_manifest(node))
    t0 = time.monotonic()
    dep = wait_deployment_ready(kubectl, "kubellm-system", "kubellm-operator", timeout=180)
    print(f"[node] operator Ready in {time.monotonic() - t0:.0f}s")
    return dep


MODELS_DIR = "models"  # under the node's state dir


@pytest.fixture(scope="session")
def models_pv(node, kubectl):
    """A local PersistentVolume on the node holding the tiny model and SmolLM2 (read-only for uid 1000)."""
    base = node.state / MODELS_DIR
    base.mkdir(parents=True, exist_ok=True)
    tiny = base / "tiny"
    if not (tiny / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "kubellm.cli", "make-tiny-model", str(tiny)], check=True, capture_output=True
        )
    smol = base / "smollm2"
    if not (smol / ".complete").exists():
        from kubellm.weights.smollm2 import demo_model_dir

        shutil.rmtree(smol, ignore_errors=True)
        shutil.copytree(demo_model_dir(), smol)
    subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    return base


@pytest.fixture
def namespace(kubectl, models_pv, node):
    with make_namespace(kubectl, models_pv, node) as ns:
        yield ns


os.environ.setdefault("NO_PROXY", "10.96.0.0/16,10.244.0.0/16")


# The tier's step times ("[real-node] ..." from the fixture, "[node] ..." from the tests) are printed while pytest
# captures output; gather them from every phase's report and print them at the end, where .ci/run collects them.
_STEP_LINES: list[str] = []


def pytest_runtest_logreport(report):
    for text in (report.capstdout, report.capstderr):
        _STEP_LINES.extend(line for line in text.splitlines() if line.startswith(("[real-node]", "[node]")))


def pytest_terminal_summary(terminalreporter):
    if _STEP_LINES:
        terminalreporter.section("node tier steps")
        for line in dict.fromkeys(_STEP_LINES):  # a fixture's output repeats in later reports of its test
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items):
    """The Helm install (test_operator_helm.py) runs first in this tier: the tests after it share the session's
    kubectl-installed operator (operator_installed), whose cluster-wide objects Helm would refuse to take over."""
    helm = [i for i in items if i.path.name == "test_operator_helm.py"]
    if helm:
        first = next(n for n, i in enumerate(items) if i.path.parent == helm[0].path.parent)
        rest = [i for i in items if i.path.name != "test_operator_helm.py"]
        items[:] = rest[:first] + helm + rest[first:]
