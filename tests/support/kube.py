"""Small helpers for cluster tests: wait for a condition on the real API."""

from __future__ import annotations

from tests.support.wait import wait_until


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.3):
    """Poll fn until it returns something truthy (the cluster tests' spelling of wait_until, what first)."""
    return wait_until(fn, timeout=timeout, interval=interval, what=what)
