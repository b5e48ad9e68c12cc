"""Each pod's load, read from its /metrics (the vLLM names every engine behind an endpoint picker exports), and
the LoRA adapters it holds, read from its /v1/models (vLLM's shape: an adapter is a model with a `parent`)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

WAITING, RUNNING, KV_USAGE = "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"
FINISHED = "vllm:request_success_total"  # requests a pod finished, from any client: activity the router did not see


def parse_load(text: str) -> tuple[float | None, float | None, float | None]:
    """(waiting, running, KV usage) from Prometheus text, each summed over its series; None when absent.

    A line scan rather than a full parse: a runtime's page is mostly histograms the router does not read."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name in (WAITING, RUNNING, KV_USAGE):
            value = line.rsplit(" ", 1)[1] if "}" not in line else line.rsplit("}", 1)[1].split()[0]
            found[name] = found.get(name, 0.0) + float(value)
    return found.get(WAITING), found.get(RUNNING), found.get(KV_USAGE)


def parse_adapters(doc) -> dict[str, str]:
    """adapter name → its parent model, from a /v1/models answer (models without a parent are the base)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return {
        m["id"]: m["parent"]
        for m in data or ()
        if isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("parent"), str)
    }


def parse_finished(text: str) -> float | None:
    """Requests the pod has finished so far (all finish reasons), None when it does not say."""
    total = None
    for line in text.splitlines():
        if line.startswith(FINISHED + "{") or line.startswith(FINISHED + " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


class Scraper:
    """Polls every watched pod's /metrics each `interval`; a value older than `stale` seconds counts as unknown."""

    def __init__(self, interval: float, stale: float, timeout: float = 1.0, models_every: int = 4):
        self.interval, self.stale, self.timeout = interval, stale, timeout
        self.models_every = models_every  # /v1/models once every this many rounds: adapters change seldom
        self.urls: set[str] = set()
        # pod URL -> adapter -> parent, as its /v1/models last said; None: it refused (401/403, API keys)
        self.adapters: dict[str, dict[str, str] | None] = {}
        self.values: dict[str, tuple[float, tuple]] = {}
        self.finished: dict[str, float] = {}  # pod URL -> its request counter at the last scrape
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    def watch(self, urls: set[str]) -> None:
        self.urls = set(urls)
        for gone in set(self.values) - self.urls:
            del self.values[gone]
        for gone in set(self.finished) - self.urls:
            del self.finished[gone]
        for gone in set(self.adapters) - self.urls:
            del self.adapters[gone]

    def gauges(self, url: str) -> tuple | None:
        got = self.values.get(url)
        if got is None or time.monotonic() - got[0] > self.stale:
            return None
        return got[1]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session:
            await self._session.close()

    async def _loop(self) -> None:
        rounds = 0
        while True:
            urls = list(self.urls)
            models = [self._scrape_models(u) for u in urls if rounds % self.models_every == 0 or u not in self.adapters]
            await asyncio.gather(*(self._scrape(u) for u in urls), *models)
            rounds += 1
            await asyncio.sleep(self.interval)

    async def _scrape_models(self, url: str) -> None:
        """A pod that does not answer keeps what it said last; one that refuses to say (401/403: it checks API
        keys, which the router does not hold) is None (discovery.held_adapters then reads the status); another
        error counts as holding no adapter."""
        try:
            async with self._session.get(url + "/v1/models") as r:
                doc = await r.json(content_type=None) if r.status == 200 else {}
                refused = r.status in (401, 403)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        if url in self.urls:
            self.adapters[url] = None if refused else parse_adapters(doc)

    async def _scrape(self, url: str) -> None:
        try:
            async with self._session.get(url + "/metrics") as r:
                if r.status != 200:
                    return
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        try:
            load, finished = parse_load(text), parse_finished(text)
        except ValueError:
            return
        if url in self.urls:
            self.values[url] = (time.monotonic(), load)
            if finished is not None:
                self.finished[url] = finished

    def busy(self, urls) -> tuple[bool, float]:
        """(any pod running or queueing something, the sum of their finished-request counters): traffic that
        reached the pods without this router (their Service, another router replica) counts as activity too."""
        running = False
        for url in urls:
            g = self.gauges(url)
            running |= bool(g and ((g[0] or 0) + (g[1] or 0)) > 0)
        return running, sum(self.finished.get(u, 0.0) for u in urls)
