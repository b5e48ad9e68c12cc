"""Every metric name and label that the Gateway API endpoint picker (GIE EPP / llm-d router), llm-d's WVA
autoscaler, vLLM production-stack's router and AIBrix read from a vLLM pod, read from a real `kubellm serve`'s
/metrics after it served requests (the contract: ../shared/reference/anchors-2026-11.md §4.1, §4.2)."""

from __future__ import annotations

import json
import pathlib

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import AUTH

GAUGES = (
    "vllm:num_requests_waiting",  # EPP queue scorer, WVA, production-stack, AIBrix, KServe KEDA examples
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",  # EPP kv-cache-utilization scorer, WVA
    "vllm:gpu_cache_usage_perc",  # the pre-0.9 name: production-stack router, AIBrix
)
COUNTERS = (
    "vllm:request_success_total",  # WVA's scale-to-zero query, by namespace and model_name
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:gpu_prefix_cache_hits_total",  # production-stack's names
    "vllm:gpu_prefix_cache_queries_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds",  # deprecated in vLLM, read by WVA
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prompt_tokens",  # WVA: _sum and _count
    "vllm:request_generation_tokens",
)


def samples(server) -> dict[str, list]:
    by_name: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            by_name.setdefault(s.name, []).append(s)
    return by_name


def test_the_pod_exports_every_name_and_label_the_picker_and_autoscalers_read(server):
    body = {"model": "tiny", "prompt": "hello there " * 24, "max_tokens": 4, "stream": True}  # several full blocks
    for _ in range(2):  # the second one finds its prompt in the prefix cache
        r = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
    got = samples(server)  # /metrics is open (no API key): the EPP scrapes it unauthenticated

    for name in GAUGES + COUNTERS:
        assert name in got, f"{name} missing"
        assert all(s.labels.get("model_name") == "tiny" for s in got[name]), got[name]
    for name in HISTOGRAMS:
        for suffix in ("_bucket", "_sum", "_count"):
            assert name + suffix in got, f"{name}{suffix} missing"
            assert all(s.labels.get("model_name") == "tiny" for s in got[name + suffix])
        assert sum(s.value for s in got[name + "_count"]) >= 1, f"{name} observed nothing"

    success = {s.labels["finished_reason"]: s.value for s in got["vllm:request_success_total"]}
    assert success.get("length", 0) >= 2
    assert got["vllm:prefix_cache_hits_total"][0].value > 0  # the repeated prompt hit
    assert got["vllm:request_generation_tokens_sum"][0].value >= 8

    # KV geometry: without it the EPP logs an extraction error on every poll and cannot tune its prefix scorer
    (info,) = got["vllm:cache_config_info"]
    assert info.value == 1 and info.labels["model_name"] == "tiny"
    assert int(info.labels["block_size"]) == 16 and int(info.labels["num_gpu_blocks"]) > 0
    assert info.labels["cache_dtype"] == "auto"  # --kv-cache-dtype


def test_our_own_names_stay_beside_the_vllm_ones(server):
    got = samples(server)
    for name in (
        "kubellm_num_requests_waiting",
        "kubellm_kv_cache_usage_ratio",
        "kubellm_time_to_first_token_seconds_count",
        "kubellm_request_success_total",
    ):
        assert name in got, name


def test_memory_gauges_say_what_the_kv_cache_holds_and_the_gpu_only_on_a_gpu(server, tiny_model):
    got = samples(server)
    (kv,) = got["kubellm_kv_cache_reserved_bytes"]
    (geometry,) = got["vllm:cache_config_info"]
    assert kv.labels["model_name"] == "tiny" and kv.labels["device"]
    # the KV tensor from the model's own shape: K and V per layer, block_size tokens per block, one spare block
    # (the padded rows' scratch), at the checkpoint's dtype (the tiny model's: float32)
    config = json.loads(pathlib.Path(tiny_model, "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}[config.get("dtype") or config["torch_dtype"]]
    block_bytes = 2 * config["num_hidden_layers"] * 16 * config.get("num_key_value_heads", heads) * head_dim * elem
    assert kv.value == (int(geometry.labels["num_gpu_blocks"]) + 1) * block_bytes
    if kv.labels["device"] == "cpu":  # no device memory of its own: absent, not a made-up 0
        assert "kubellm_gpu_memory_used_bytes" not in got and "kubellm_gpu_memory_total_bytes" not in got
    else:
        (used,), (total,) = got["kubellm_gpu_memory_used_bytes"], got["kubellm_gpu_memory_total_bytes"]
        assert used.labels == total.labels == kv.labels
        assert kv.value <= used.value <= total.value
