"""`make demo`: the main job end to end on this machine — a local Kubernetes control plane with one real node
(containerd, kubelet, kube-proxy), the operator installed with Helm from the project's own images, an
InferenceService serving SmolLM2-135M-Instruct from a local PersistentVolume, its progress and conditions until
Ready, then a chat through its Service with the official openai client. Step timings at the end.

Needs root and changes the host (Debian packages, /etc/containers/containers.conf, a cgroup mount, iptables
chains and a bridge while it runs): `make demo-clean` undoes it. Cached binaries and images make a second run
fast. `--keep` leaves the cluster running (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS: list[tuple[str, float]] = []


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"==> {msg}", flush=True)


class step:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        say(self.name)
        self.t0 = time.monotonic()

    def __exit__(self, *exc):
        dt = time.monotonic() - self.t0
        STEPS.append((self.name, dt))
        print(f"    ({dt:.1f}s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="leave the cluster running until Ctrl-C")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit(
            "make demo runs a real node (containerd, kubelet, iptables): run it as root; make demo-local runs "
            "only the server"
        )
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from kubernetes import config

    from kubellm.weights.smollm2 import demo_model_dir
    from tests.support.local_cluster import bin_dir
    from tests.support.real_node import NODE_NAME, NodeCluster, RealNode, node_ip, setup

    total = time.monotonic()
    work = pathlib.Path(tempfile.mkdtemp(prefix="kubellm-demo-"))
    with step("host setup: packages, host fixes, kubelet/kube-proxy/helm, images (cached after the first run)"):
        env = setup()
        print(f"    operator image {env['OPERATOR_IMAGE']}, runtime image {env['RUNTIME_IMAGE']}")
    with step("Kubernetes control plane (etcd, apiserver, controller-manager, scheduler)"):
        cluster = NodeCluster(bin_dir(), work / "cluster", node_ip())
        cluster.start()
        config.load_kube_config(str(cluster.kubeconfig))
    node = RealNode(env, cluster, work)
    try:
        with step(f"real node {NODE_NAME}: containerd (+ image import), kubelet, kube-proxy"):
            node.start()
        kubectl = node.kubectl
        print(kubectl("get", "nodes", "-o", "wide").stdout)
        with step("install the operator: helm install kubellm charts/kubellm"):
            helm = pathlib.Path(env["HELM"]) / "helm"
            repo, _, tag = env["OPERATOR_IMAGE"].rpartition(":")
            subprocess.run(
                [
                    str(helm),
                    "install",
                    "kubellm",
                    str(ROOT / "charts/kubellm"),
                    "--namespace",
                    "kubellm-system",
                    "--create-namespace",
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "--set",
                    f"image.repository={repo}",
                    "--set",
                    f"image.tag={tag}",
                    "--set",
                    f"runtimeImage={env['RUNTIME_IMAGE']}",
                    "--wait",
                    "--timeout",
                    "5m",
                ],
                check=True,
            )
            print(kubectl("get", "pods", "-n", "kubellm-system", "-o", "wide").stdout)
        with step("SmolLM2-135M-Instruct onto a local PersistentVolume (converted once from the PyPI wheel)"):
            models = node.state / "models"
            smol = models / "smollm2"
            if not (smol / ".complete").exists():
                shutil.rmtree(smol, ignore_errors=True)
                shutil.copytree(demo_model_dir(), smol)
            subprocess.run(["chmod", "-R", "a+rX", str(models)], check=True)
            kubectl("apply", "-f", "-", input=json.dumps(pv_and_claim(str(models))))
        with step("kubectl apply an InferenceService (resources.gpus: 0) and watch it until Ready"):
            kubectl("apply", "-f", "-", input=json.dumps(ISVC))
            watch_until_ready(kubectl)
        with step("chat through the Service (ClusterIP, kube-proxy) with the openai client"):
            chat(kubectl)
        say("step timings")
        for name, dt in STEPS:
            print(f"  {dt:7.1f}s  {name}")
        print(f"  {time.monotonic() - total:7.1f}s  total", flush=True)
        if args.keep:
            print(
                f"\ncluster running: export KUBECONFIG={cluster.kubeconfig}; "
                f"{cluster.bin / 'kubectl'} get kisvc,pods -o wide\nCtrl-C stops it.",
                flush=True,
            )
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        say("stopping the node and the control plane (make demo-clean also undoes the host fixes)")
        node.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


ISVC = {
    "apiVersion": "kubellm.io/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "smollm2", "namespace": "default"},
    "spec": {
        "model": {"uri": "pvc://models/smollm2", "name": "SmolLM2-135M-Instruct"},
        "runtime": {"maxModelLen": 2048, "maxNumSeqs": 8},
        "resources": {"gpus": 0, "requests": {"cpu": "500m", "memory": "1Gi"}},
        "autoscaling": {"enabled": False},
        "replicas": 1,
    },
}


def pv_and_claim(path: str) -> dict:
    from tests.support.real_node import NODE_NAME

    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "kubellm-demo-models"},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "local": {"path": path},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                            ]
                        }
                    ]
                }
            },
            "claimRef": {"namespace": "default", "name": "models"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models", "namespace": "default"},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": "kubellm-demo-models",
            "resources": {"requests": {"storage": "5Gi"}},
        },
    }
    return {"apiVersion": "v1", "kind": "List", "items": [pv, pvc]}


def watch_until_ready(kubectl, timeout: float = 600) -> None:
    """Print the InferenceService's phase, conditions and pods whenever they change."""
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        o = json.loads(kubectl("get", "kisvc", "smollm2", "-n", "default", "-o", "json").stdout)
        st = o.get("status") or {}
        pods = json.loads(
            kubectl("get", "pods", "-n", "default", "-l", "kubellm.io/inferenceservice=smollm2", "-o", "json").stdout
        )["items"]
        pod_view = [
            (
                p["metadata"]["name"],
                p["status"].get("phase"),
                ",".join(
                    f"{c['name']}:{'ready' if c.get('ready') else next(iter(c.get('state', {})), '?')}"
                    for c in p["status"].get("containerStatuses", [])
                ),
            )
            for p in pods
        ]
        conds = [(c["type"], c["status"], c.get("reason", ""), c.get("message", "")) for c in st.get("conditions", [])]
        view = (st.get("replicas"), st.get("readyReplicas"), tuple(conds), tuple(pod_view))
        if view != last:
            stamp = time.strftime("%H:%M:%S")
            print(f"  {stamp} replicas={st.get('replicas', 0)} readyReplicas={st.get('readyReplicas', 0)}")
            for t, s, r, m in conds:
                print(f"           {t}={s} {r}: {m}")
            for name, phase, cs in pod_view:
                print(f"           pod {name} {phase} {cs}")
            last = view
        if any(t == "Ready" and s == "True" for t, s, _, _ in conds):
            print(kubectl("get", "kisvc", "-n", "default").stdout)
            return
        time.sleep(2)
    raise SystemExit("the InferenceService did not become Ready: see kubectl describe kisvc smollm2")


def chat(kubectl) -> None:
    from openai import OpenAI

    svc = json.loads(kubectl("get", "service", "smollm2", "-n", "default", "-o", "json").stdout)
    base = f"http://{svc['spec']['clusterIP']}/v1"
    print(f"    Service smollm2 → {base}")
    client = OpenAI(base_url=base, api_key="none", max_retries=2)
    model = client.models.list().data[0].id
    for question in ("What is the capital of France?", "Name three colors of the rainbow."):
        print(f"\n  user: {question}\n  {model}: ", end="", flush=True)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "10.96.0.0/16,10.244.0.0/16")
    sys.exit(main())
