"""Small helpers for cluster tests: wait for a condition on the real API."""

from __future__ import annotations

import time


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.3):
    """Poll fn until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
