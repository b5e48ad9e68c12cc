"""Run `kubellm operator` as a real process against the test cluster (so a test can also restart it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from kubellm.runtime.process import free_port
from tests.support.server import read_log, wait_http_ok

# The runtime image the test operator renders (its KUBELLM_RUNTIME_IMAGE); the cluster tier's in-process
# reconciles render it too (tests/cluster/conftest.py), or the two would roll each other's Deployments.
RUNTIME_IMAGE = "example.invalid/kubellm:test"


class OperatorProcess:
    def __init__(self, kubeconfig, *extra_args: str):
        self.kubeconfig = str(kubeconfig)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path = f"/tmp/kubellm-operator-{os.getpid()}-{id(self)}.log"
        self.metrics_port = free_port()

    def start(self) -> OperatorProcess:
        port = free_port()
        self.health = f"http://127.0.0.1:{port}/healthz"
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "KUBELLM_RUNTIME_IMAGE": RUNTIME_IMAGE}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubellm.cli",
                "operator",
                f"--liveness={self.health}",
                f"--metrics-port={self.metrics_port}",
                *self.extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_http_ok("kubellm operator", self.health, self.proc, self.log_path, 60)
        return self

    def logs(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        """Die without cleanup, as a crashed or evicted operator would."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()
