"""A real node for the test control plane: containerd (private root and socket), a kubelet and kube-proxy built
from the same Kubernetes version, the project's images imported from podman. Used by the `node` test tier and
`make demo`; needs root and a Linux host that can run containers (tests/support/node-setup.sh prepares it).

    python -m tests.support.real_node      # bring one up by hand; prints how to point kubectl at it

What it changes on the host while running, all undone by stop() (and by tests/support/node-cleanup.sh after a
crash): a CNI bridge `kcni0` with pod subnet 10.244.0.0/24, kube-proxy's and kubelet's iptables chains,
containerd/kubelet state under /var/lib/kubellm-node and /run/kubellm-node, `kubepods` cgroups. Kept between
runs on purpose: the images in the node's containerd (/var/lib/kubellm-node/containerd), so a second run
neither rebuilds nor re-imports them.

The control plane is the project's LocalCluster with three changes so that pods see it as a real cluster:
the apiserver listens on all addresses and advertises the node's IP, with the lease endpoint reconciler, so the
`kubernetes` Service (10.96.0.1:443) reaches it through kube-proxy — in-cluster clients run unchanged; the
apiserver reaches kubelets by InternalIP with a client certificate the kubelet trusts (kubectl logs/exec); kwok
manages only nodes annotated `kwok.x-k8s.io/node=fake` (and hands out fake pod IPs from another range).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.support.local_cluster import LocalCluster
from tests.support.wait import wait_until

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
NODE_NAME = "kubellm-node-1"
POD_SUBNET = "10.244.0.0/24"
BRIDGE = "kcni0"
RUN = pathlib.Path("/run/kubellm-node")
KWOK_CIDR = "10.245.0.0/16"


def node_ip() -> str:
    """The host's address on its default route: the kubelet's InternalIP and the apiserver's advertised one."""
    out = subprocess.run(["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout.split()
    if "src" in out:
        return out[out.index("src") + 1]
    raise RuntimeError("no IPv4 default route: cannot pick an address for the node and the apiserver")


def _wait(what: str, fn, timeout: float, proc: subprocess.Popen, logf: pathlib.Path | None = None) -> None:
    """Wait for a component: errors mean "not yet", its exit fails at once with its log's tail."""

    def up():
        if proc.poll() is not None:
            tail = logf.read_text(errors="replace")[-4000:] if logf and logf.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}\n{tail}")
        try:
            return fn()
        except Exception:
            return False

    wait_until(up, timeout=timeout, interval=0.5, what=what)


def log(msg: str) -> None:
    print(f"[real-node] {msg}", file=sys.stderr, flush=True)


def setup(images_only: bool = False) -> dict[str, str]:
    """Run node-setup.sh (idempotent, cached); returns its KEY=VALUE output. Raises with the reason on failure."""
    env = {**os.environ, **({"KUBELLM_NODE_IMAGES_ONLY": "1"} if images_only else {})}
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(HERE / "node-setup.sh")], capture_output=True, text=True, env=env)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"node-setup.sh failed ({p.returncode}):\n{p.stderr[-4000:]}")
    log(f"node-setup: {time.monotonic() - t0:.0f}s")
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


class NodeCluster(LocalCluster):
    """LocalCluster whose `kubernetes` Service is reachable from pods on a real node (see the module docstring)."""

    def __init__(self, bin_dir, work_dir, advertise: str):
        super().__init__(bin_dir, work_dir)
        self.advertise = advertise

    def _spawn(self, name, args):
        P = self.pki
        if name == "kube-apiserver":
            args = [a for a in args if not a.startswith(("--bind-address", "--advertise-address", "--endpoint-rec"))]
            args += [
                "--bind-address=0.0.0.0",
                f"--advertise-address={self.advertise}",
                "--endpoint-reconciler-type=lease",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={P / 'admin.crt'}",
                f"--kubelet-client-key={P / 'admin.key'}",
            ]
        elif name == "kwok":
            args = [a for a in args if not a.startswith(("--manage-all-nodes", "--cidr"))]
            args += [
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={KWOK_CIDR}",
            ]
        return super()._spawn(name, args)


class RealNode:
    def __init__(self, env: dict[str, str], cluster: LocalCluster, work_dir):
        self.env = env
        self.cluster = cluster
        self.work = pathlib.Path(work_dir)
        self.state = pathlib.Path(env["STATE"])
        self.node_bins = pathlib.Path(env["NODE_BINS"])
        self.ip = node_ip()
        self.sock = RUN / "containerd.sock"
        self.procs: list[tuple[str, subprocess.Popen, pathlib.Path]] = []
        self.images = {k: env[k] for k in ("OPERATOR_IMAGE", "RUNTIME_IMAGE", "PAUSE_IMAGE")}
        self._lock = None

    # ---------------------------------------------------------------- helpers
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logf = self.work / f"{name}.log"
        proc = subprocess.Popen(
            args,
            stdout=open(logf, "ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append((name, proc, logf))
        return proc

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.sock), "-n", "k8s.io", *args], **kw)

    def kubectl(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        p = subprocess.run([str(self.cluster.bin / "kubectl"), f"--kubeconfig={self.cluster.kubeconfig}", *args], **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {p.stderr or p.stdout}")
        return p

    # ------------------------------------------------------------- containerd
    def _start_containerd(self) -> None:
        RUN.mkdir(parents=True, exist_ok=True)
        cni = RUN / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-kubellm-bridge.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "kubellm-pods",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(RUN / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                        {"type": "loopback"},
                    ],
                }
            )
        )
        cfg = RUN / "containerd.toml"
        cfg.write_text(
            f"""version = 2
root = "{self.state / "containerd"}"
state = "{RUN / "containerd-state"}"
[grpc]
  address = "{self.sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.images["PAUSE_IMAGE"]}"
  # the VM lacks CAP_SYS_RESOURCE: kubelet asks oom_score_adj -998 for sandboxes, which runc cannot set
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"""
        )
        proc = self._spawn("containerd", ["containerd", "--config", str(cfg)])
        _wait(
            "containerd",
            lambda: self.ctr("version", capture_output=True).returncode == 0,
            30,
            proc,
            self.work / "containerd.log",
        )

    def _has_image(self, tag: str) -> bool:
        out = self.ctr("images", "ls", "-q", capture_output=True, text=True).stdout.split()
        return tag in out

    def _import_images(self) -> dict[str, float]:
        """Each image podman built that this containerd lacks; the podman copy is then removed (disk)."""
        times = {}
        marks = self.state / "imported"
        marks.mkdir(parents=True, exist_ok=True)
        for key in ("PAUSE_IMAGE", "OPERATOR_IMAGE", "RUNTIME_IMAGE"):
            tag = self.images[key]
            if self._has_image(tag):
                continue
            if subprocess.run(["podman", "image", "exists", tag]).returncode != 0:  # marker but wiped containerd
                for m in marks.iterdir():
                    m.unlink()
                self.images.update({k: v for k, v in setup(images_only=True).items() if k in self.images})
                tag = self.images[key]
            t0 = time.monotonic()
            save = subprocess.Popen(["podman", "save", "--format", "docker-archive", tag], stdout=subprocess.PIPE)
            self.ctr("images", "import", "--digests", "-", stdin=save.stdout, check=True, capture_output=True)
            if save.wait() != 0:
                raise RuntimeError(f"podman save {tag} failed")
            times[key] = time.monotonic() - t0
            log(f"imported {tag} in {times[key]:.0f}s")
            size = subprocess.run(
                ["podman", "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True
            ).stdout.strip()
            (marks / tag.replace("/", "_").replace(":", "_")).write_text(size)
            self._drop_older(tag)
            if key != "PAUSE_IMAGE" and not os.environ.get("KUBELLM_NODE_KEEP_IMAGES"):
                subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
                subprocess.run(["podman", "image", "prune", "-f"], capture_output=True)
        return times

    def _drop_older(self, tag: str) -> None:
        """Other tags of the same image (an earlier code version) and every record naming their content: the
        import's `import-<date>@sha256:…` and the CRI's `sha256:<image id>` point at the same manifest, and
        while one of them is left containerd keeps all its layers (the store grew by the runtime image's
        ~6 GB with every code version). Records left by stores before this (content no tag names) go too.
        Shared layers stay; the rest is collected."""
        repo = tag.rpartition(":")[0]
        listing = self.ctr("images", "ls", capture_output=True, text=True).stdout.splitlines()[1:]
        records = [(cols[0], cols[2]) for cols in map(str.split, listing) if len(cols) > 2]  # (name, manifest)
        older = {digest for name, digest in records if name.rpartition(":")[0] == repo and name != tag}
        older |= {d for _, d in records} - {d for n, d in records if not n.startswith(("import-", "sha256:"))}
        older -= {digest for name, digest in records if name == tag}
        for name, digest in records:
            if digest in older:
                self.ctr("images", "rm", "--sync", name, capture_output=True)  # --sync: after containerd's GC
                (self.state / "imported" / name.replace("/", "_").replace(":", "_")).unlink(missing_ok=True)

    # ------------------------------------------------------- kubelet, proxy
    def _kubelet_config(self) -> pathlib.Path:
        P = self.cluster.pki
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "imageServiceEndpoint": f"unix://{self.sock}",
            "failCgroupV1": False,  # this VM is cgroup v1 (hybrid); kubelet >= 1.35 refuses v1 by default
            "cgroupDriver": "cgroupfs",  # containerd 1.6 has no RuntimeConfig RPC
            "failSwapOn": False,
            "podLogsDir": str(self.state / "pod-logs"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(P / "ca.crt")},  # the apiserver's kubelet client cert
            },
            "authorization": {"mode": "AlwaysAllow"},
            "address": self.ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "resolvConf": "/etc/resolv.conf",
            "clusterDomain": "cluster.local",
            "clusterDNS": [],
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": [],
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,  # never GC the imported images: they cannot be pulled back
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "localStorageCapacityIsolation": False,  # no fs stats for /dev/vda in this VM (see the recipe)
            "protectKernelDefaults": False,
            "makeIPTablesUtilChains": False,
            "registerNode": True,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
        }
        path = RUN / "kubelet-config.json"
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def _start_kubelet(self) -> None:
        root = self.state / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(
            "kubelet",
            [
                str(self.node_bins / "kubelet"),
                f"--config={self._kubelet_config()}",
                f"--root-dir={root}",
                f"--hostname-override={NODE_NAME}",
                f"--kubeconfig={self.cluster.kubeconfig}",
                f"--node-ip={self.ip}",
                "--v=1",
            ],
        )

        def ready():
            p = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if p.returncode != 0:
                return False
            conds = json.loads(p.stdout)["status"].get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        _wait("kubelet (node Ready)", ready, 120, proc, self.work / "kubelet.log")

    def _start_kube_proxy(self) -> None:
        proc = self._spawn(
            "kube-proxy",
            [
                str(self.node_bins / "kube-proxy"),
                f"--kubeconfig={self.cluster.kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_SUBNET}",
                "--conntrack-max-per-core=0",
                "--oom-score-adj=0",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
                "--v=1",
            ],
        )
        import urllib.request

        _wait(
            "kube-proxy",
            lambda: urllib.request.urlopen("http://127.0.0.1:10256/healthz", timeout=2).status == 200,
            60,
            proc,
            self.work / "kube-proxy.log",
        )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> dict[str, float]:
        RUN.mkdir(parents=True, exist_ok=True)
        self._lock = open(RUN.parent / "kubellm-node.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError("another real node is running on this host (/run/kubellm-node.lock)") from None
        subprocess.run(["bash", str(HERE / "node-cleanup.sh")], check=False)  # leftovers of a crashed run
        for knob, value in (("net/ipv4/ip_forward", "1"), ("net/bridge/bridge-nf-call-iptables", "1")):
            p = pathlib.Path("/proc/sys") / knob
            if p.exists():
                p.write_text(value)
        times = {}
        t0 = time.monotonic()
        self._start_containerd()
        times.update({f"import {k}": v for k, v in self._import_images().items()})
        times["containerd + imports"] = time.monotonic() - t0
        t0 = time.monotonic()
        self._start_kubelet()
        self._start_kube_proxy()
        times["kubelet + kube-proxy (node Ready)"] = time.monotonic() - t0
        return times

    def delete_workloads(self, timeout: float = 90) -> None:
        """Delete every pod-owning object outside kube-system (and the CRs), then wait for the node to empty:
        pods stopped by the kubelet run their CNI DEL, so nothing leaks."""
        for args in (
            ("delete", "inferenceservices.kubellm.io", "--all-namespaces", "--all", "--wait=false"),
            ("delete", "deployments,replicasets,statefulsets,jobs", "--all-namespaces", "--all", "--wait=false"),
            ("delete", "pods", "--all-namespaces", "--all", "--wait=false", "--grace-period=5"),
        ):
            self.kubectl(*args, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.kubectl(
                "get", "pods", "-A", "--field-selector", f"spec.nodeName={NODE_NAME}", "-o", "name", check=False
            )
            if p.returncode == 0 and not p.stdout.strip():
                return
            time.sleep(1)
        self.kubectl("delete", "pods", "-A", "--all", "--force", "--grace-period=0", check=False)

    def stop(self) -> None:
        try:
            if any(n == "kubelet" and p.poll() is None for n, p, _ in self.procs):
                self.delete_workloads()
        except Exception as e:  # the control plane may already be gone
            log(f"deleting workloads: {e!r}")
        for name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            if name == "kube-proxy":
                subprocess.run(
                    [str(self.node_bins / "kube-proxy"), "--cleanup", "--proxy-mode=iptables"], capture_output=True
                )
        self.procs.clear()
        subprocess.run(["bash", str(HERE / "node-cleanup.sh")], check=False)
        if self._lock:
            self._lock.close()
            self._lock = None

    def image_sizes(self) -> dict[str, int]:
        """Uncompressed size of each project image (podman's figure, recorded when it was imported)."""
        marks = self.state / "imported"
        out = {}
        for key in ("OPERATOR_IMAGE", "RUNTIME_IMAGE"):
            m = marks / self.images[key].replace("/", "_").replace(":", "_")
            out[key] = int(m.read_text() or 0)
        return out

    def run_in_image(self, image: str, *cmd: str, timeout: float = 180) -> str:
        """Run a command as a pod of the image on this node (its own user, read-only root); returns its output."""
        name = f"kubellm-check-{time.monotonic_ns() % 10**9}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "check",
                        "image": image,
                        "command": list(cmd),
                        "securityContext": {
                            "runAsNonRoot": True,
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # as the operator renders it
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
            },
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(pod))
        try:

            def done():
                ph = self.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
                return ph if ph in ("Succeeded", "Failed") else None

            phase = wait_until(done, timeout=timeout, interval=1, what=f"pod {name} ({image}) to finish")
            out = self.kubectl("logs", name).stdout
            if phase != "Succeeded":
                raise RuntimeError(f"{' '.join(cmd)} in {image} failed:\n{out}")
            return out
        finally:
            self.kubectl("delete", "pod", name, "--wait=false", check=False)

    def check_alive(self) -> None:
        for name, proc, logf in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{logf.read_text()[-3000:]}")


def start_real_cluster(work_dir) -> tuple[NodeCluster, RealNode, dict[str, float]]:
    """node-setup, control plane, containerd + images, kubelet, kube-proxy; returns them and each step's time."""
    from kubernetes import config

    from tests.support.local_cluster import bin_dir

    if os.geteuid() != 0:
        raise RuntimeError("the real node needs root (containerd, kubelet, iptables, cgroups)")
    times = {}
    t0 = time.monotonic()
    env = setup()
    times["node-setup (packages, fixes, bins, images)"] = time.monotonic() - t0
    t0 = time.monotonic()
    cluster = NodeCluster(bin_dir(), pathlib.Path(work_dir) / "cluster", node_ip())
    node = RealNode(env, cluster, work_dir)
    try:
        cluster.start()
        config.load_kube_config(str(cluster.kubeconfig))
        times["control plane"] = time.monotonic() - t0
        times.update(node.start())
    except BaseException:
        node.stop()
        cluster.stop()
        raise
    for k, v in times.items():
        log(f"{k}: {v:.0f}s")
    return cluster, node, times


if __name__ == "__main__":
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="kubellm-node-")
    c, n, _ = start_real_cluster(work)
    print(
        f"real node up; in another shell:\n  export KUBECONFIG={c.kubeconfig}\n  {c.bin / 'kubectl'} get nodes -o wide"
    )
    print("  images: " + " ".join(n.images.values()) + "\nCtrl-C stops it.", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        n.stop()
        c.stop()
        shutil.rmtree(work, ignore_errors=True)
