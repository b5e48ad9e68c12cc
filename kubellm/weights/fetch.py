"""fetch_model: download a model (hf://org/name[@revision] or s3://bucket/prefix) into a directory, printing its
progress (kubellm/downloads.py) and writing a completion marker last. The operator runs it in the init container
of each pod, or once in the model cache's Job; a directory whose marker names the same URI is not downloaded
again, and `wait_for_model` holds a pod until the marker is there. The cache Job also leaves the model's config
(the keys the fit check reads) in its termination message, where the operator reads it before any replica
starts."""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import threading
import time
from dataclasses import asdict, replace

from kubellm import fit
from kubellm.downloads import COMPLETE_MARKER, DownloadProgress, config_report, progress_line

HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class _Reporter:
    """Prints the progress line every `interval` seconds while it changes, and once at the end."""

    def __init__(self, uri: str, out, interval: float):
        self.uri, self.out, self.interval = uri, out, interval
        self.total_bytes: int | None = None
        self.total_files: int | None = None
        self.files = 0
        self._bytes = 0
        self._measure = None  # a function returning the bytes so far, where callbacks cannot count them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last = ""
        self._thread = threading.Thread(target=self._loop, name="download-progress", daemon=True)

    def add(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def snapshot(self, done: bool = False) -> DownloadProgress:
        got = self._measure() if self._measure else self._bytes
        return DownloadProgress(self.uri, got, self.total_bytes, self.files, self.total_files, done=done)

    def emit(self, p: DownloadProgress) -> None:
        line = progress_line(p)
        if line != self._last:
            self._last = line
            print(line, file=self.out, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            p = self.snapshot()
            if p.total_bytes is not None or p.bytes:  # nothing to say while the listing runs
                self.emit(p)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def read_marker(dest: str) -> DownloadProgress | None:
    try:
        with open(os.path.join(dest, COMPLETE_MARKER)) as f:
            return DownloadProgress(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _write_marker(dest: str, p: DownloadProgress) -> None:
    tmp = os.path.join(dest, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(p), f)
    os.replace(tmp, os.path.join(dest, COMPLETE_MARKER))


def report_config(uri: str, dest: str, path: str) -> bool:
    """Write the model's fit-relevant config (kubellm.downloads:config_report) to `path`, the container's
    termination-message file; False when the model has no readable config.json or the file cannot be written."""
    try:
        config = fit.fit_config(fit.read_config(dest))
    except (OSError, ValueError, AttributeError) as e:
        print(f"fetch-model: no config to report ({type(e).__name__}: {e})", file=sys.stderr)
        return False
    return fit.write_termination_message(config_report(uri, config), path)


def fetch_model(uri: str, dest: str, interval: float = 1.0, out=None, termination_message: str | None = None) -> str:
    """Download `uri` into `dest` (unless a complete copy is there); with `termination_message` (a file path),
    then write the model's config there (report_config)."""
    out = out or sys.stdout
    scheme, _, rest = uri.partition("://")
    if scheme not in ("hf", "s3"):
        raise SystemExit(f"cannot fetch {uri!r}: only hf:// and s3:// are downloaded (pvc:// is mounted)")
    done = read_marker(dest)
    if done is not None and done.uri == uri:  # a complete copy (the cache's Job re-run, a restarted pod)
        print(progress_line(replace(done, cached=True)), file=out, flush=True)
        if termination_message:
            report_config(uri, dest, termination_message)
        return dest
    os.makedirs(dest, exist_ok=True)
    with _Reporter(uri, out, interval) as reporter:
        if scheme == "hf":
            _fetch_hf(rest, dest, reporter)
        else:
            _fetch_s3(rest, dest, reporter)
        final = reporter.snapshot(done=True)
    _write_marker(dest, final)
    reporter.emit(final)
    if termination_message:
        report_config(uri, dest, termination_message)
    return dest


def _fetch_s3(rest: str, dest: str, reporter: _Reporter) -> None:
    try:
        import boto3
    except ImportError:
        raise SystemExit("s3:// models need boto3 (the runtime image has it; pip install 'kubellm[server]')") from None
    bucket, _, prefix = rest.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # s3://b/tiny is the folder tiny/, not also tiny2/
    # AWS_ENDPOINT_URL (an S3-compatible server) and the credentials come from the environment, as for the AWS CLI
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    if not objects:
        raise SystemExit(f"no objects under s3://{bucket}/{prefix}")
    reporter.total_bytes = sum(o["Size"] for o in objects)
    reporter.total_files = len(objects)
    root = os.path.realpath(dest)
    for obj in objects:
        target = os.path.realpath(os.path.join(root, obj["Key"][len(prefix) :]))
        if not target.startswith(root + os.sep):
            raise SystemExit(f"refusing the object key {obj['Key']!r}: it leads outside {dest}")
        if os.path.exists(target) and os.path.getsize(target) == obj["Size"]:
            reporter.add(obj["Size"])  # kept from an interrupted run (download_file renames a file when whole)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            s3.download_file(bucket, obj["Key"], target, Callback=reporter.add)
        reporter.files += 1


def _fetch_hf(rest: str, dest: str, reporter: _Reporter) -> None:
    from huggingface_hub import HfApi, snapshot_download

    repo, _, revision = rest.partition("@")
    token = os.environ.get("HF_TOKEN")
    try:
        info = HfApi(token=token).model_info(repo, revision=revision or None, files_metadata=True)
        sizes = [s.size or 0 for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in HF_PATTERNS)]
        reporter.total_bytes, reporter.total_files = sum(sizes), len(sizes)
    except Exception as e:  # progress without a total is still progress: the download itself decides
        print(f"fetch-model: no file sizes for {repo} ({type(e).__name__}); reporting bytes only", file=sys.stderr)
    # huggingface_hub has no byte callback: count what has reached the directory (partial files included)
    reporter._measure = lambda: _tree_bytes(dest)
    snapshot_download(repo_id=repo, revision=revision or None, local_dir=dest, token=token, allow_patterns=HF_PATTERNS)
    reporter.files = reporter.total_files or 0
    reporter._measure = None
    reporter.add(reporter.total_bytes if reporter.total_bytes is not None else _tree_bytes(dest))


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # renamed or removed meanwhile
                pass
    return total


def wait_for_model(dest: str, uri: str, poll_s: float = 2.0, timeout_s: float | None = None, out=None) -> int:
    """Hold a pod until the model cache's Job has completed a copy of `uri` in `dest` (0), or timeout (1)."""
    out = out or sys.stdout
    start = time.monotonic()
    said = -1.0
    while True:
        done = read_marker(dest)
        if done is not None and done.uri == uri:
            print(f"wait-for-model: {uri} is in {dest} ({done.summary()})", file=out, flush=True)
            return 0
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            print(f"wait-for-model: {uri} not in {dest} after {waited:.0f}s", file=out, flush=True)
            return 1
        if waited - said >= 30:
            said = waited
            print(
                f"wait-for-model: waiting for the model cache's Job to fill {dest} ({waited:.0f}s)",
                file=out,
                flush=True,
            )
        time.sleep(poll_s)
