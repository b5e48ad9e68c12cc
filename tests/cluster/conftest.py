"""Cluster fixtures: one real control plane per pytest session (built from Go modules on first use),
fake GPU nodes, the test custom-metrics API, and a fresh namespace per test."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.support.local_cluster import DEFAULT_GPU_NODES, start_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("k8s"), DEFAULT_GPU_NODES)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def custom_metrics(cluster):
    from tests.support import fake_custom_metrics as fcm

    pki = cluster.pki
    fake = fcm.FakeCustomMetrics(
        api_url=cluster.server,
        ca=str(pki / "ca.crt"),
        cert=str(pki / "admin.crt"),
        key=str(pki / "admin.key"),
        serving_cert=str(pki / "apiserver.crt"),
        serving_key=str(pki / "apiserver.key"),
    ).start()
    fake.default = 0  # every runtime pod reports an empty queue unless a test says otherwise
    fcm.register(fake)
    try:
        yield fake
    finally:
        try:
            fcm.unregister()
        except Exception as e:  # noqa: BLE001 — at session end the client's default configuration may point at the
            # node tier's cluster, already stopped (connection refused); this tier's cluster goes away with its fixture
            print(f"custom metrics APIService left registered: {e!r}")
        fake.stop()


@pytest.fixture
def namespace(cluster):
    from kubernetes import client

    core = client.CoreV1Api()
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30  # the ServiceAccount controller creates "default" shortly after
    while not core.list_namespaced_service_account(name).items and time.monotonic() < deadline:
        time.sleep(0.2)
    yield name
    core.delete_namespace(name)
    cluster.check_alive()


@pytest.fixture(scope="session")
def kubectl(cluster):
    """Run the kubectl built with the control plane against it; returns stdout, raises with stderr."""
    import subprocess

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [str(cluster.bin / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {r.stderr}")
        return r

    return run


@pytest.fixture(scope="session")
def crd_installed(kubectl):
    import pathlib

    from kubernetes import client

    from tests.support.kube import wait_for

    kubectl("apply", "-f", str(pathlib.Path(__file__).resolve().parents[2] / "crds"))
    ext = client.ApiextensionsV1Api()
    wait_for(
        "the CRD to be established",
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition("inferenceservices.kubellm.io").status.conditions or []
        ),
    )


@pytest.fixture(autouse=True)
def _render_the_operators_image(monkeypatch):
    """A test's in-process Reconciler renders the runtime image the tier's operator renders: the operator also
    reconciles that InferenceService, and two images would roll its Deployment back and forth."""
    from kubellm.operator import render
    from tests.support.operator import RUNTIME_IMAGE

    monkeypatch.setattr(render, "DEFAULT_IMAGE", RUNTIME_IMAGE)


@pytest.fixture(scope="session")
def operator(cluster, crd_installed, custom_metrics):
    from tests.support.operator import OperatorProcess

    op = OperatorProcess(cluster.kubeconfig).start()
    try:
        yield op
    finally:
        op.stop()
