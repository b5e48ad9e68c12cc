"""What a model download says about itself, shared by the downloader (`kubellm fetch-model`, in the runtime
image) and the operator (which has neither boto3 nor huggingface_hub): the progress line the downloader prints
to its log, and the marker file it writes once every byte is in place. Standard library only.

Pods have no API token, so the downloader cannot patch the InferenceService: it prints one JSON line per
interval, and the operator reads the last line of the pod's log (`pods/log`). The runtime says the same way
which start-up phase it is in (startup_line: loading the weights, then warming up: KV cache, CUDA graphs, the
first forward), before it listens: the operator tells them apart in status.replicaStatuses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PROGRESS_KEY = "kubellmDownload"
STARTUP_KEY = "kubellmStartup"
LOADING_WEIGHTS, WARMING_UP = "LoadingWeights", "WarmingUp"  # a runtime's start-up phases, in order
STARTUP_PHASES = (LOADING_WEIGHTS, WARMING_UP)
CONFIG_KEY = "kubellmModelConfig"  # the cache Job's termination message: the model's config (config_report)
COMPLETE_MARKER = ".kubellm-complete"  # in the model directory: its content is a DownloadProgress as JSON


@dataclass(frozen=True)
class DownloadProgress:
    uri: str
    bytes: int
    total_bytes: int | None  # None while unknown
    files: int
    total_files: int | None
    done: bool = False
    cached: bool = False  # the directory already held a complete copy: nothing was downloaded

    @property
    def percent(self) -> float | None:
        if self.done:
            return 100.0
        if not self.total_bytes:
            return None
        return min(100.0, 100.0 * self.bytes / self.total_bytes)

    def summary(self) -> str:
        """One line for people: "42% (12.1 of 28.9 MiB, 3/7 files)"."""
        if self.cached:
            return f"already cached ({_size(self.bytes)})"
        pct = self.percent
        amount = f"{_size(self.bytes)} of {_size(self.total_bytes)}" if self.total_bytes else _size(self.bytes)
        files = f", {self.files}/{self.total_files} files" if self.total_files else ""
        return f"{pct:.0f}% ({amount}{files})" if pct is not None else f"{amount}{files}"


def progress_line(p: DownloadProgress) -> str:
    return json.dumps({PROGRESS_KEY: asdict(p)}, separators=(",", ":"))


def parse_progress_line(line: str) -> DownloadProgress | None:
    """The progress in one log line, or None for any other line (a traceback, a library's warning)."""
    try:
        fields = json.loads(line)[PROGRESS_KEY]
        return DownloadProgress(**fields)
    except (ValueError, KeyError, TypeError):
        return None


def last_progress(log_text: str) -> DownloadProgress | None:
    for line in reversed(log_text.splitlines()):
        if (p := parse_progress_line(line.strip())) is not None:
            return p
    return None


def startup_line(phase: str) -> str:
    """The runtime's line (its stderr) as it enters a start-up phase: LOADING_WEIGHTS, then WARMING_UP."""
    return json.dumps({STARTUP_KEY: phase}, separators=(",", ":"))


def last_startup_phase(log_text: str) -> str | None:
    """The last start-up phase a runtime's log names (None: none yet, or only other lines)."""
    for line in reversed(log_text.splitlines()):
        try:
            phase = json.loads(line)[STARTUP_KEY]
        except (ValueError, KeyError, TypeError):
            continue
        if phase in STARTUP_PHASES:
            return phase
    return None


def config_report(uri: str, config: dict) -> str:
    """What the cache Job's downloader leaves in its termination message once the model is complete: the URI and
    the config.json keys the fit check reads (kubellm.fit:fit_config), for the operator to check before any
    replica starts."""
    return json.dumps({CONFIG_KEY: {"uri": uri, "config": config}}, separators=(",", ":"))


def parse_config_report(text: str) -> tuple[str, dict] | None:
    """(uri, config) from a downloader's termination message; None for anything else (empty, truncated, a
    message of another program)."""
    try:
        report = json.loads(text)[CONFIG_KEY]
        uri, config = report["uri"], report["config"]
    except (ValueError, KeyError, TypeError):
        return None
    return (uri, config) if isinstance(uri, str) and isinstance(config, dict) else None


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
