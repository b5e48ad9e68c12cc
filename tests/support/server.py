"""Run a real `kubellm serve` process on a free port for tests; always stopped, even when a test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from kubellm.runtime.process import free_port
from tests.support.wait import raise_if_exited, wait_until

KEY = "sk-test-key-1"  # the API key of the e2e tests' shared server (tests/e2e/conftest.py)


def wait_http_ok(what: str, url: str, proc: subprocess.Popen, log_path: str, timeout: float) -> None:
    """Poll url until it answers 200; fail early (with the log's tail) if the process dies."""

    def ok() -> bool:
        raise_if_exited(proc, what, log_path)
        return httpx.get(url, timeout=1).status_code == 200

    try:
        wait_until(ok, timeout=timeout, interval=0.2, what=f"{what} at {url}", retry_on=(httpx.HTTPError,))
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{read_log(log_path)[-3000:]}") from None


def read_log(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


class ServerProcess:
    def __init__(self, model_dir: str, *args: str, log_path: str | None = None, module: str = "kubellm.cli"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or f"/tmp/kubellm-serve-{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            module,  # tests/support/faulty_serve.py: the same CLI with an engine core that fails on purpose
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

    def wait_ready(self, timeout: float = 600) -> ServerProcess:
        """Wait for /ready; on failure stop the process (the caller's try/finally has not begun yet). The timeout
        only bounds a hung start: a process that exits fails at once, and a loaded 2-core machine starts slowly."""
        try:
            wait_http_ok("kubellm serve", self.url + "/ready", self.proc, self.log_path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self) -> str:
        return read_log(self.log_path)

    def metric(self, name: str) -> float:
        """The value of one unlabelled-or-single-series metric from /metrics."""
        for line in httpx.get(self.url + "/metrics", timeout=60).text.splitlines():
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
