"""Node-tier fixtures: the test control plane with one real node (containerd, kubelet, kube-proxy), the
project's images built with podman and imported, the operator installed as users install it, models on a
local PersistentVolume. If this machine cannot run containers the session fails with the reason, never skips."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.support.wait import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
G, V, P = "kubellm.io", "v1alpha1", "inferenceservices"


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


def operator_manifest(node, replicas: int | None = None, extra_args: list[str] | None = None) -> str:
    """manifests/operator.yaml with the locally built images (the only change a user on this cluster needs)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/operator.yaml").read_text()) if d]
    for d in docs:
        if d["kind"] == "Deployment":
            if replicas is not None:
                d["spec"]["replicas"] = replicas
            c = d["spec"]["template"]["spec"]["containers"][0]
            c["image"] = node.images["OPERATOR_IMAGE"]
            c["args"] = c["args"] + (extra_args or [])
            for e in c.get("env", []):
                if e["name"] == "KUBELLM_RUNTIME_IMAGE":
                    e["value"] = node.images["RUNTIME_IMAGE"]
    return yaml.safe_dump_all(docs, sort_keys=False)


def wait_deployment_ready(kubectl, ns: str, name: str, timeout: float = 180) -> dict:
    def ready():
        p = kubectl("get", "deployment", name, "-n", ns, "-o", "json", check=False)
        if p.returncode:
            return None
        d = json.loads(p.stdout)
        want = d["spec"].get("replicas", 1)
        st = d.get("status", {})
        ok = st.get("readyReplicas", 0) == want and st.get("updatedReplicas", 0) == want
        return d if ok and st.get("replicas", 0) == want else None

    return wait_until(ready, timeout=timeout, interval=1, what=f"deployment {ns}/{name} ready")


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


@contextlib.contextmanager
def make_namespace(kubectl, models_pv, node):
    """A fresh namespace with a PVC `models` bound to a local PV of the models directory."""
    ns = f"n-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"models-{ns}"},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "local": {"path": str(models_pv)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node_name()]}
                            ]
                        }
                    ]
                }
            },
            "claimRef": {"namespace": ns, "name": "models"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models", "namespace": ns},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": f"models-{ns}",
            "resources": {"requests": {"storage": "5Gi"}},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, pvc]}))
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", check=False)
    kubectl("delete", "pv", f"models-{ns}", "--wait=false", check=False)
    node.check_alive()


@pytest.fixture
def namespace(kubectl, models_pv, node):
    with make_namespace(kubectl, models_pv, node) as ns:
        yield ns


def node_name() -> str:
    from tests.support.real_node import NODE_NAME

    return NODE_NAME


os.environ.setdefault("NO_PROXY", "10.96.0.0/16,10.244.0.0/16")
