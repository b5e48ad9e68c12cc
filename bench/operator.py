"""Operator benchmark on the local control plane: apply N InferenceServices at once, measure the time from
each create to its children existing (p50/p99) and to Ready, and the operator's resident memory.

    python bench/operator.py --count 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()

    from kubernetes import client, watch

    from tests.support.local_cluster import start_cluster
    from tests.support.operator import OperatorProcess

    nodes = {f"gpu-8x-{i}": 8 for i in range((args.count + 7) // 8 + 1)}
    cluster = start_cluster(tempfile.mkdtemp(prefix="kubellm-bench-"), nodes)
    op = None
    try:
        import subprocess

        subprocess.run(
            [str(cluster.bin / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "apply", "-f", "crds"],
            check=True,
            capture_output=True,
        )
        time.sleep(2)
        op = OperatorProcess(cluster.kubeconfig).start()
        rss_idle = rss_mib(op.proc.pid)
        ns = "bench"
        client.CoreV1Api().create_namespace({"metadata": {"name": ns}})
        created: dict[str, float] = {}
        children_at: dict[str, float] = {}
        done = threading.Event()

        def watch_deployments():
            w = watch.Watch()
            for ev in w.stream(client.AppsV1Api().list_namespaced_deployment, ns, timeout_seconds=600):
                name = ev["object"].metadata.name
                children_at.setdefault(name, time.monotonic())
                if len(children_at) >= args.count:
                    w.stop()
            done.set()

        threading.Thread(target=watch_deployments, daemon=True).start()
        time.sleep(1)
        api = client.CustomObjectsApi()
        t0 = time.monotonic()
        for i in range(args.count):
            name = f"svc-{i:03d}"
            created[name] = time.monotonic()
            api.create_namespaced_custom_object(
                "kubellm.io",
                "v1alpha1",
                ns,
                "inferenceservices",
                {
                    "apiVersion": "kubellm.io/v1alpha1",
                    "kind": "InferenceService",
                    "metadata": {"name": name},
                    "spec": {"model": {"uri": "hf://org/model"}, "autoscaling": {"enabled": False}},
                },
            )
        create_s = time.monotonic() - t0
        done.wait(600)
        lat = [children_at[n] - created[n] for n in created if n in children_at]

        def ready_count():
            items = api.list_namespaced_custom_object("kubellm.io", "v1alpha1", ns, "inferenceservices")["items"]
            return sum(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (o.get("status") or {}).get("conditions", [])
                )
                for o in items
            )

        deadline = time.monotonic() + 600
        while ready_count() < args.count and time.monotonic() < deadline:
            time.sleep(1)
        all_ready_s = time.monotonic() - t0
        rss_loaded = rss_mib(op.proc.pid)
        print(
            "| InferenceServices | create calls (s) | apply → Deployment p50 (s) | p99 (s) | max (s) | "
            "all Ready after (s) | operator RSS idle / loaded (MiB) |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {args.count} | {create_s:.1f} | {pct(lat, 50):.2f} | {pct(lat, 99):.2f} | {max(lat):.2f} | "
            f"{all_ready_s:.1f} ({ready_count()} ready) | {rss_idle:.0f} / {rss_loaded:.0f} |"
        )
    finally:
        if op:
            op.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
