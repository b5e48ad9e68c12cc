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
    fake = fcm.FakeCustomMetrics(api_url=cluster.server, ca=str(pki / "ca.crt"), cert=str(pki / "admin.crt"),
                                 key=str(pki / "admin.key"), serving_cert=str(pki / "apiserver.crt"),
                                 serving_key=str(pki / "apiserver.key")).start()
    fcm.register(fake)
    try:
        yield fake
    finally:
        fcm.unregister()
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
