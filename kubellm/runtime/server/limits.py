"""Who may call and how often: API keys (constant-time, reloaded from a mounted file) and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Keys from flags plus a file (one per line, # comments); the file is re-read when its mtime changes."""

    def __init__(self, keys: list[str], path: str | None, recheck_s: float = 1.0):
        self._static = [_digest(k) for k in keys if k]
        self._path = path
        self._file_keys: list[bytes] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        if path:
            self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return bool(self._static or self._path)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self._recheck_s:
            return
        self._checked = now
        try:
            mtime = os.stat(self._path).st_mtime
        except FileNotFoundError:
            self._file_keys, self._mtime = [], None
            return
        if force or mtime != self._mtime:
            with open(self._path) as f:
                lines = [line.strip() for line in f]
            self._file_keys = [_digest(k) for k in lines if k and not k.startswith("#")]
            self._mtime = mtime

    def check(self, presented: str | None) -> bool:
        if not self.enabled:
            return True
        if self._path:
            with self._lock:
                self._reload()
        candidate = _digest(presented or "")
        ok = False
        for known in self._static + self._file_keys:  # compare against every key: timing reveals nothing
            ok |= hmac.compare_digest(candidate, known)
        return ok and presented is not None


class RateLimiter:
    """Token bucket per caller: `rpm` requests per minute, bursts up to `burst`. Callers are kept by digest
    (a 1 MB key costs 32 bytes), least recently seen first: a bucket that has refilled is dropped (it equals a
    new one), and past max_buckets the least recent goes anyway, so memory stays bounded."""

    def __init__(self, rpm: float | None, burst: int, max_buckets: int = 100_000):
        self.rate = rpm / 60.0 if rpm else None
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: dict[bytes, tuple[float, float]] = {}  # caller's digest → (tokens, last refill)

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, caller: str) -> float | None:
        """None if allowed; otherwise the seconds until a request would be."""
        if self.rate is None:
            return None
        now = time.monotonic()
        key = _digest(caller)
        tokens, last = self._buckets.pop(key, (float(self.burst), now))  # re-inserted last: most recent
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        self._evict(now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets))
            tokens, last = buckets[oldest]
            if len(buckets) < self.max_buckets and tokens + (now - last) * self.rate < self.burst:
                return
            del buckets[oldest]
