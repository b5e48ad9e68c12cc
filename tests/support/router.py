"""Run real `kubellm router` processes and fake backends for tests and benchmarks; always stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from kubellm.runtime.process import free_port
from tests.support.server import read_log, wait_http_ok

# What kubellm/router/discovery.py calls, and so all charts/kubellm/templates/router.yaml grants (checked there by
# tests/node/test_chart.py; tests/cluster/test_router_cluster.py runs the router under exactly these rules)
ROUTER_RULES = [
    {"apiGroups": ["kubellm.io"], "resources": ["inferenceservices"], "verbs": ["list"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
]


class Process:
    def __init__(self, cmd: list[str], log_name: str):
        self.log_path = f"/tmp/{log_name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ})

    def logs(self) -> str:
        return read_log(self.log_path)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class FakeBackends(Process):
    """Fake pods (tests/support/fake_backend.py), one port each, in one process."""

    def __init__(self, count: int, models: str = "fake", token_rate: float = 50.0, slots: int = 64):
        self.ports = [free_port() for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        ports = ",".join(map(str, self.ports))
        cmd = [sys.executable, "-m", "tests.support.fake_backend", "--ports", ports, "--models", models]
        super().__init__(
            cmd + ["--token-rate", str(token_rate), "--slots", str(slots)], f"fake-backends-{self.ports[0]}"
        )
        for url in self.urls:
            wait_http_ok("fake backend", url + "/metrics", self.proc, self.log_path, 30)


class RouterProcess(Process):
    """`kubellm router --endpoints-file` on a free port; `write_routes` rewrites the file it re-reads."""

    def __init__(self, routes_path: str, routes: dict, *args: str):
        self.routes_path = routes_path
        self.write_routes(routes)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kubellm.cli", "router", "--endpoints-file", routes_path]
        super().__init__(cmd + ["--host", "127.0.0.1", "--port", str(self.port), *args], f"kubellm-router-{self.port}")
        wait_http_ok("kubellm router", self.url + "/ready", self.proc, self.log_path, 60)

    def write_routes(self, routes: dict) -> None:
        tmp = self.routes_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"models": routes}, f)
        os.replace(tmp, self.routes_path)

    def request_logs(self) -> list[dict]:
        lines = [json.loads(x) for x in self.logs().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("msg") == "request"]


class KubeRouterProcess(Process):
    """`kubellm router --namespace NS` on this host against a cluster (the node tier: pod IPs are routable here)."""

    def __init__(self, kubeconfig: str, namespace: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kubellm.cli", "router", "--namespace", namespace, "--host", "127.0.0.1"]
        self.log_path = f"/tmp/kubellm-router-{self.port}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        cmd += ["--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        wait_http_ok("kubellm router", self.url + "/ready", self.proc, self.log_path, 60)

    def request_logs(self) -> list[dict]:
        lines = [json.loads(x) for x in self.logs().splitlines() if x.startswith("{")]
        return [x for x in lines if x.get("msg") == "request"]

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=10).text
