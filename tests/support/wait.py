"""The one polling loop of the tests: call a predicate until it holds, or fail saying what was awaited."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 60,
    interval: float = 0.3,
    what: str = "a condition",
    *,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call predicate every interval seconds until it returns something truthy, and return that value.

    An exception of a type in retry_on counts as "not yet" (a server still starting); any other exception
    propagates at once, so a predicate fails fast by raising (a process that died). After timeout seconds,
    raise TimeoutError naming what and the last value or error seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except retry_on as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def raise_if_exited(proc: subprocess.Popen, what: str, log_path: str | os.PathLike, tail: int = 3000) -> None:
    """Fail a wait at once, with the log's tail, when the process it waits on has died."""
    if proc.poll() is not None:
        with open(log_path, "rb") as f:
            log = f.read().decode(errors="replace")
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log[-tail:]}")
