"""Run a real `kubellm serve` process on a free port for tests; always stopped, even when a test fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def wait_http_ok(what: str, url: str, proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    """Poll url until it answers 200; fail early (with the log's tail) if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{read_log(log_path)[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{read_log(log_path)[-3000:]}")


def read_log(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: str, *args: str, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or f"/tmp/kubellm-serve-{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "kubellm.cli",
            "serve",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        wait_http_ok("kubellm serve", self.url + "/ready", self.proc, self.log_path, timeout)
        return self

    def logs(self) -> str:
        return read_log(self.log_path)

    def metric(self, name: str) -> float:
        """The value of one unlabelled-or-single-series metric from /metrics."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
