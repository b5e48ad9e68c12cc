"""Helpers for the node tier (tests/node): the operator manifest with local images, namespaces with the
models PersistentVolume, InferenceService objects and their pods, openai clients through a Service."""

from __future__ import annotations

import contextlib
import json
import pathlib
import uuid

import yaml
from openai import OpenAI

from tests.support.wait import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
G, V, P = "kubellm.io", "v1alpha1", "inferenceservices"


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


def node_name() -> str:
    from tests.support.real_node import NODE_NAME

    return NODE_NAME


SMALL = {"requests": {"cpu": "100m", "memory": "256Mi"}}  # 2-core node: operators and several runtime pods fit


def isvc(name: str, model: str, **spec) -> dict:
    body = {
        "model": {"uri": f"pvc://models/{model}"},
        "runtime": {"maxModelLen": 512, "maxNumSeqs": 4, "maxNumBatchedTokens": 512},
        "resources": {"gpus": 0, **SMALL},
        "autoscaling": {"enabled": False},
        "replicas": 1,
        "startup": {"timeoutSeconds": 300},
        "server": {"drainSeconds": 60},
    }
    body.update(spec)
    return {"apiVersion": f"{G}/{V}", "kind": "InferenceService", "metadata": {"name": name}, "spec": body}


def get(kubectl, *args) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def apply(kubectl, ns: str, obj: dict) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def wait_isvc_ready(kubectl, ns: str, name: str, timeout: float = 300) -> dict:
    def ready():
        o = get(kubectl, P, name, "-n", ns)
        conds = (o.get("status") or {}).get("conditions", [])
        return o if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) else None

    return wait_until(ready, timeout=timeout, interval=2, what=f"{ns}/{name} Ready")


def pods(kubectl, ns: str, name: str) -> list[dict]:
    return get(kubectl, "pods", "-n", ns, "-l", f"kubellm.io/inferenceservice={name}")["items"]


def ready_pods(kubectl, ns, name) -> list[dict]:
    return [
        p
        for p in pods(kubectl, ns, name)
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def client_for(host: str, port: int = 80, api_key: str = "none") -> OpenAI:
    return OpenAI(base_url=f"http://{host}:{port}/v1", api_key=api_key, max_retries=0, timeout=120)


def service_client(kubectl, ns: str, name: str, api_key: str = "none") -> OpenAI:
    svc = get(kubectl, "service", name, "-n", ns)
    return client_for(svc["spec"]["clusterIP"], 80, api_key)
