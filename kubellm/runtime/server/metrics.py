"""Prometheus metrics: engine state read at scrape time and per-request histograms observed by the server, each
under our kubellm_* name and under vLLM's `vllm:` name with a `model_name` label: the names an endpoint picker
(GIE EPP, llm-d router), llm-d's WVA, the production-stack router, AIBrix and vLLM dashboards read
(tests/e2e/test_metrics_contract.py checks every one)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

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


TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


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
        # vLLM's name since 0.9, and the older one the production-stack router and AIBrix still read
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            yield self._gauge(name, "Fraction of KV-cache blocks in use (0-1).", usage)
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", e.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", e.prefix_cache_hits),
            ("num_preemptions", "Sequences preempted.", e.num_preemptions),
            ("prompt_tokens", "Prompt tokens computed.", e.prompt_tokens),
            ("generation_tokens", "Tokens generated.", e.generation_tokens),
        )
        for name, doc, value in counters:
            yield self._counter(f"kubellm_{name}", doc, value)
            yield self._counter(f"vllm:{name}", doc, value)
        for name, doc, value in counters[:2]:  # vLLM's pre-0.9 names (production-stack router)
            yield self._counter(f"vllm:gpu_{name}", doc, value)
        info = self.engine.info
        if info is not None:  # KV geometry, once the model is loaded: the EPP's prefix scorer tunes itself on it
            config = InfoMetricFamily("vllm:cache_config", "KV-cache configuration.", labels=["model_name"])
            geometry = {
                "block_size": str(self.engine.config.block_size),
                "num_gpu_blocks": str(info.num_gpu_blocks),
                "cache_dtype": self.engine.config.kv_cache_dtype,  # vLLM's label: auto, fp8, …
            }
            config.add_metric(list(self.labels.values()), geometry)
            yield config
        yield from self._lora_info(e)
        yield from self._spec_decode(e)
        yield from self._memory(e)

    def _memory(self, e):
        """Memory gauges by model_name and device (rank 0's device with tensor parallelism), once the engine is up.
        The KV cache's bytes are its tensor's on any device; the GPU's used/total come from the driver and are
        absent on a CPU (host memory is not the model's device memory, and a 0 would read as an empty GPU)."""
        info = self.engine.info
        if info is None:
            return
        labels = [*self.labels, "device"]
        values = [*self.labels.values(), info.device]
        gauges = [
            (
                "kubellm_kv_cache_reserved_bytes",
                "Bytes held for the KV cache on its device (its whole tensor, used blocks or not). "
                "kubellm_gpu_memory_*_bytes are exported only on a CUDA device.",
                e.kv_cache_bytes,
            )
        ]
        if e.device_memory_total_bytes is not None:
            gauges += [
                (
                    "kubellm_gpu_memory_used_bytes",
                    "GPU memory in use as the driver reports it (every process on the device, as nvidia-smi).",
                    e.device_memory_used_bytes,
                ),
                ("kubellm_gpu_memory_total_bytes", "GPU memory in total.", e.device_memory_total_bytes),
            ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            yield g

    def _lora_info(self, e):
        """vLLM's vllm:lora_requests_info (with --enable-lora): labels say which adapters run and wait, the
        value is when (consumers take the newest series)."""
        config = self.engine.config
        if not config.enable_lora:
            return
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters of the running and waiting requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric([str(config.max_loras), ",".join(e.running_loras), ",".join(e.waiting_loras)], time.time())
        yield info

    def _spec_decode(self, e):
        """vLLM's speculative-decoding counters (zero without --speculative-config); accepted tokens per step
        = 1 + accepted / drafts."""
        for prefix in ("kubellm_", "vllm:"):
            yield self._counter(f"{prefix}spec_decode_num_drafts", "Drafts proposed.", e.spec_num_drafts)
            yield self._counter(
                f"{prefix}spec_decode_num_draft_tokens", "Draft tokens proposed.", e.spec_num_draft_tokens
            )
            yield self._counter(
                f"{prefix}spec_decode_num_accepted_tokens", "Draft tokens accepted.", e.spec_num_accepted_tokens
            )
            c = CounterMetricFamily(
                f"{prefix}spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in the draft.",
                labels=[*self.labels, "position"],
            )
            for position, count in enumerate(e.spec_accepted_per_position):
                c.add_metric([*self.labels.values(), str(position)], count)
            yield c


class Twin:
    """One observation, two series: ours (as before, unlabelled or by our labels) and vLLM's name with the
    model_name label (several vLLM names where consumers read an old one too)."""

    def __init__(self, ours, *vllm):
        self.ours, self.vllm = ours, vllm

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        for v in self.vllm:
            v.observe(value)

    def labels(self, *values: str) -> Twin:
        return Twin(self.ours.labels(*values), *(v.labels(*values) for v in self.vllm))

    def inc(self, amount: float = 1) -> None:
        self.ours.inc(amount)
        for v in self.vllm:
            v.inc(amount)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        r = self.registry

        def hist(name, doc, *vllm_names, buckets=LATENCY_BUCKETS):
            ours = Histogram(name, doc, buckets=buckets, registry=r)
            theirs = [Histogram(v, doc, ["model_name"], buckets=buckets, registry=r) for v in vllm_names]
            return Twin(ours, *(h.labels(model_name) for h in theirs))

        self.ttft = hist(
            "kubellm_time_to_first_token_seconds", "Arrival to first token.", "vllm:time_to_first_token_seconds"
        )
        self.itl = hist(
            "kubellm_inter_token_latency_seconds",
            "Time between consecutive streamed tokens.",
            "vllm:inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",  # deprecated in vLLM, still read by llm-d's WVA
        )
        self.e2e = hist(
            "kubellm_e2e_request_latency_seconds", "Arrival to last token.", "vllm:e2e_request_latency_seconds"
        )
        self.queue = hist(
            "kubellm_request_queue_time_seconds", "Arrival to first scheduling.", "vllm:request_queue_time_seconds"
        )
        self.prompt_tokens = hist(
            "kubellm_request_prompt_tokens",
            "Prompt tokens per request.",
            "vllm:request_prompt_tokens",
            buckets=TOKEN_BUCKETS,
        )
        self.generation_tokens = hist(
            "kubellm_request_generation_tokens",
            "Generated tokens per request.",
            "vllm:request_generation_tokens",
            buckets=TOKEN_BUCKETS,
        )
        self.rejected = Counter("kubellm_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r)
        ours = Counter(
            "kubellm_request_success", "Finished requests, by finish reason.", ["finished_reason"], registry=r
        )
        theirs = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.finished = _ByReason(ours, theirs, model_name)


class _ByReason:
    """`finished.labels(reason).inc()` on both counters (vLLM's has model_name first)."""

    def __init__(self, ours: Counter, theirs: Counter, model_name: str):
        self.ours, self.theirs, self.model_name = ours, theirs, model_name

    def labels(self, reason: str) -> Twin:
        return Twin(self.ours.labels(reason), self.theirs.labels(self.model_name, reason))
