"""A real Kubernetes control plane on 127.0.0.1 for tests and hand use: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler (built from upstream Go modules, see build-k8s-bins.sh) and KWOK
simulating GPU nodes.

    python -m tests.support.local_cluster      # start one by hand; prints how to point kubectl at it
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from kubellm.runtime.process import free_port
from tests.support.wait import raise_if_exited, wait_until

BUILD_SCRIPT = pathlib.Path(__file__).with_name("build-k8s-bins.sh")

SERVICE_CIDR = "10.96.0.0/16"  # first IP 10.96.0.1 is in the apiserver cert SANs
POD_CIDR = "10.244.0.0/16"  # kwok hands out fake pod IPs from here


def _wait(what, fn, timeout, proc, log):
    """Wait for a component to come up; connection errors mean "not yet", its exit fails at once."""

    def up():
        raise_if_exited(proc, what, log, tail=4000)
        return fn()

    wait_until(up, timeout=timeout, interval=0.5, what=what, retry_on=(OSError, http.client.HTTPException))


class LocalCluster:
    def __init__(self, bin_dir, work_dir):
        self.bin = pathlib.Path(bin_dir)
        self.work = pathlib.Path(work_dir)
        self.pki = self.work / "pki"
        self.procs = []  # [(name, Popen, logpath)]
        self.ports = {n: free_port() for n in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler")}
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        self.kubeconfig = self.work / "admin.kubeconfig"

    # ---------------------------------------------------------------- PKI ---
    def _gen_pki(self):
        self.pki.mkdir(parents=True, exist_ok=True)
        d = str(self.pki)

        def run(*a):
            subprocess.run(a, cwd=d, check=True, capture_output=True)

        def ca(name, cn):
            run(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                f"/CN={cn}",
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.crt",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            )

        common = (
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        )

        def leaf(name, subj, ca_name, ext):
            (self.pki / f"{name}.ext").write_text(common + ext)
            run(
                "openssl",
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subj,
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
            )
            run(
                "openssl",
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                f"{ca_name}.crt",
                "-CAkey",
                f"{ca_name}.key",
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                f"{name}.ext",
                "-out",
                f"{name}.crt",
            )

        ca("ca", "kube-test-ca")
        ca("front-proxy-ca", "kube-test-front-proxy-ca")
        leaf(
            "apiserver",
            "/CN=kube-apiserver",
            "ca",
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,"
            "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local\n",
        )
        leaf("admin", "/O=system:masters/CN=kubernetes-admin", "ca", "extendedKeyUsage=clientAuth\n")
        leaf("front-proxy-client", "/CN=front-proxy-client", "front-proxy-ca", "extendedKeyUsage=clientAuth\n")
        run("openssl", "genrsa", "-out", "sa.key", "2048")
        run("openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _write_kubeconfig(self):
        p = self.pki
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "local",
            "clusters": [
                {"name": "local", "cluster": {"server": self.server, "certificate-authority": str(p / "ca.crt")}}
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {"client-certificate": str(p / "admin.crt"), "client-key": str(p / "admin.key")},
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML

    # ---------------------------------------------------------- processes ---
    def _spawn(self, name, args):
        log = self.work / f"{name}.log"
        f = open(log, "wb")
        proc = subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.work,
            start_new_session=True,
        )
        self.procs.append((name, proc, log))
        return proc, log

    def _https_ok(self, url, verify=True):
        if verify:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        else:
            ctx = ssl._create_unverified_context()
        with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
            return r.status == 200

    def start(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self._gen_pki()
        self._write_kubeconfig()
        P, port, kc = self.pki, self.ports, str(self.kubeconfig)

        etcd_url = f"http://127.0.0.1:{port['etcd']}"
        peer_url = f"http://127.0.0.1:{port['etcd_peer']}"
        proc, log = self._spawn(
            "etcd",
            [
                "etcd",
                "--name=node0",
                f"--data-dir={self.work / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=node0={peer_url}",
                "--unsafe-no-fsync=true",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        _wait(
            "etcd",
            lambda: b'"health":"true"' in urllib.request.urlopen(etcd_url + "/health", timeout=2).read(),
            30,
            proc,
            log,
        )

        proc, log = self._spawn(
            "kube-apiserver",
            [
                "kube-apiserver",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port['apiserver']}",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--tls-cert-file={P / 'apiserver.crt'}",
                f"--tls-private-key-file={P / 'apiserver.key'}",
                f"--client-ca-file={P / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={P / 'sa.pub'}",
                f"--service-account-signing-key-file={P / 'sa.key'}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={P / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={P / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={P / 'front-proxy-client.key'}",
                "--profiling=false",
                "--v=1",
            ],
        )
        _wait("kube-apiserver", lambda: self._https_ok(self.server + "/readyz"), 120, proc, log)

        common = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--v=1",
        ]
        proc, log = self._spawn(
            "kube-controller-manager",
            [
                "kube-controller-manager",
                *common,
                f"--secure-port={port['kcm']}",
                f"--service-account-private-key-file={P / 'sa.key'}",
                f"--root-ca-file={P / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--node-monitor-period=2s",
                "--horizontal-pod-autoscaler-sync-period=2s",
                "--horizontal-pod-autoscaler-downscale-stabilization=0s",
            ],
        )
        _wait(
            "kube-controller-manager",
            lambda: self._https_ok(f"https://127.0.0.1:{port['kcm']}/healthz", verify=False),
            60,
            proc,
            log,
        )

        proc, log = self._spawn("kube-scheduler", ["kube-scheduler", *common, f"--secure-port={port['scheduler']}"])
        _wait(
            "kube-scheduler",
            lambda: self._https_ok(f"https://127.0.0.1:{port['scheduler']}/healthz", verify=False),
            60,
            proc,
            log,
        )

        self._spawn(
            "kwok",
            [
                "kwok",
                f"--kubeconfig={kc}",
                "--manage-all-nodes=true",
                f"--config={self.bin / 'kwok-stages.yaml'}",
                "--node-lease-duration-seconds=40",
                f"--cidr={POD_CIDR}",
            ],
        )
        return self

    def stop(self):
        """Stop every process we started (whole process groups), newest first; safe to call twice."""
        for _name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.procs.clear()

    # ------------------------------------------------------------- nodes ---
    def create_gpu_node(
        self,
        name: str,
        gpus: int = 8,
        product: str = "NVIDIA-H100-80GB-HBM3",
        timeout: float = 60,
        labels: dict[str, str] | None = None,
    ):
        """A KWOK node with nvidia.com/gpu capacity (and more `labels`, e.g. nvidia.com/gpu.memory); returns once
        it is Ready and schedulable."""
        from kubernetes import client

        res = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
        core = client.CoreV1Api()
        core.create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": product,
                        "nvidia.com/gpu.count": str(gpus),
                        **(labels or {}),
                    },
                },
                "status": {"capacity": res, "allocatable": res},
            }
        )

        def schedulable():  # Ready (kwok) and the not-ready taint removed (KCM)
            n = core.read_node(name)
            ready = any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
            tainted = any(t.key.startswith("node.kubernetes.io/") for t in (n.spec.taints or []))
            return n if ready and not tainted else None

        return wait_until(schedulable, timeout=timeout, interval=0.3, what=f"node {name} schedulable")

    def check_alive(self):
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{pathlib.Path(log).read_text()[-3000:]}")


def bin_dir() -> pathlib.Path:
    """The cached binaries, building them first (once per machine, ~10–55 min cold) when missing."""
    if os.environ.get("K8S_TEST_BIN"):
        return pathlib.Path(os.environ["K8S_TEST_BIN"])
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    path = pathlib.Path(out.strip().splitlines()[-1])
    print(f"[local_cluster] binaries in {path} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    return path


def start_cluster(work_dir: str | os.PathLike, gpu_nodes: dict[str, int] | None = None) -> LocalCluster:
    """Start a cluster (stopped at interpreter exit at the latest) with the given {node name: GPUs}."""
    from kubernetes import config

    cluster = LocalCluster(bin_dir(), work_dir)
    atexit.register(cluster.stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a killed test run still stops the cluster
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        cluster.start()
        config.load_kube_config(str(cluster.kubeconfig))
        for name, gpus in (gpu_nodes or {}).items():
            cluster.create_gpu_node(name, gpus)
    except BaseException:
        cluster.stop()
        raise
    print(f"[local_cluster] control plane up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return cluster


DEFAULT_GPU_NODES = {"gpu-1x-a": 1, "gpu-1x-b": 1, "gpu-8x-a": 8, "gpu-8x-b": 8}


if __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="kubellm-cluster-")
    c = start_cluster(work, DEFAULT_GPU_NODES)
    kubectl = c.bin / "kubectl"
    print(
        f"cluster running; in another shell:\n  export KUBECONFIG={c.kubeconfig}\n  {kubectl} get nodes\n"
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        c.stop()
