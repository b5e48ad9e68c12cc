"""Run `kubellm operator` as a real process against the test cluster (so a test can also restart it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.support.server import free_port


class OperatorProcess:
    def __init__(self, kubeconfig):
        self.kubeconfig = str(kubeconfig)
        self.proc: subprocess.Popen | None = None
        self.log_path = f"/tmp/kubellm-operator-{os.getpid()}.log"
        self.metrics_port = free_port()

    def start(self) -> "OperatorProcess":
        port = free_port()
        self.health = f"http://127.0.0.1:{port}/healthz"
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "KUBELLM_RUNTIME_IMAGE": "example.invalid/kubellm:test"}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubellm.cli", "operator", f"--liveness={self.health}",
                                      f"--metrics-port={self.metrics_port}"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(self.health, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not live:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

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
