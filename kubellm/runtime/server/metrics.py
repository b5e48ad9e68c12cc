"""Prometheus metrics: engine state read at scrape time (kubellm_* plus vLLM-compatible aliases) and
per-request latency histograms observed by the server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)


class EngineCollector:
    """Reads the engine's latest snapshot (sent with every step) when Prometheus scrapes."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float):
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float):
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):
        e = self.engine.snapshot
        running, waiting, usage = e.num_running, self.engine.num_waiting, e.kv_cache_usage
        for prefix in ("kubellm_", "vllm:"):
            yield self._gauge(f"{prefix}num_requests_running", "Requests in the running batch.", running)
            yield self._gauge(f"{prefix}num_requests_waiting", "Requests waiting (queued or swapped out).", waiting)
        yield self._gauge("kubellm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).", usage)
        yield self._gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", usage)
        yield self._counter(
            "kubellm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", e.prefix_cache_queries
        )
        yield self._counter(
            "kubellm_prefix_cache_hits", "Prompt tokens found in the prefix cache.", e.prefix_cache_hits
        )
        yield self._counter("kubellm_num_preemptions", "Sequences preempted.", e.num_preemptions)
        yield self._counter("kubellm_prompt_tokens", "Prompt tokens computed.", e.prompt_tokens)
        yield self._counter("kubellm_generation_tokens", "Tokens generated.", e.generation_tokens)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        r = self.registry

        def hist(name, doc):
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = hist("kubellm_time_to_first_token_seconds", "Arrival to first token.")
        self.itl = hist("kubellm_inter_token_latency_seconds", "Time between consecutive streamed tokens.")
        self.e2e = hist("kubellm_e2e_request_latency_seconds", "Arrival to last token.")
        self.queue = hist("kubellm_request_queue_time_seconds", "Arrival to first scheduling.")
        self.rejected = Counter("kubellm_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r)
        self.finished = Counter(
            "kubellm_request_success", "Finished requests, by finish reason.", ["finished_reason"], registry=r
        )
