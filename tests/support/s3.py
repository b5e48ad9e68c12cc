"""A real S3-compatible server for the s3:// tests: moto's server mode in its own process (`moto_server`), bound
to a given address (the node tier binds it to the node's IP so pods reach it), and helpers to fill a bucket."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

from tests.support.wait import wait_until

# moto accepts any credentials; the downloader must still send them (boto3 refuses to sign without)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(host: str = "127.0.0.1", log_path: pathlib.Path | None = None):
    """Yield the endpoint URL of a moto S3 server running in a child process; stopped on exit."""
    port = _free_port(host)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://{host}:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        with socket.create_connection((host, port), timeout=1):
            return True

    try:
        wait_until(up, timeout=60, what=f"moto_server on {endpoint}", retry_on=(OSError,))
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if log_path:
            log.close()


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def upload_tree(endpoint: str, bucket: str, prefix: str, root: pathlib.Path) -> dict[str, bytes]:
    """Put every file under root at prefix/relative-path (creating the bucket); returns {relative path: bytes}."""
    s3 = s3_client(endpoint)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    put = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}" if prefix else rel, Body=data)
        put[rel] = data
    return put


def downloader_env(endpoint: str) -> dict[str, str]:
    """The environment `kubellm fetch-model` gets from model.credentialsSecret, for a local server."""
    return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


class ThrottledProxy:
    """A TCP proxy in front of the S3 server that sends its answers at `bytes_per_s` and counts what it sent:
    a download then lasts long enough to be watched, and a test can tell whether anything was downloaded."""

    def __init__(self, host: str, target: str, bytes_per_s: float):
        self.target = target.removeprefix("http://").split(":")
        self.rate = bytes_per_s
        self.sent = 0
        self._lock = threading.Lock()
        self._server = socket.create_server((host, 0))
        self.url = f"http://{host}:{self._server.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        chunk = 64 << 10
        try:
            while data := src.recv(chunk):
                if throttled:
                    time.sleep(len(data) / self.rate)
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._server.close()
