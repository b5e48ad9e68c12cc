"""`kubellm serve --kv-cache-dtype fp8` (vLLM's flag) through the official openai client: the completion is HF's
greedy one on keys and values rounded through FP8 (the checkpoint's per-layer scales), /metrics reports the
cache's dtype and its one-byte blocks, and a value the engine does not know stops the start naming the flag."""

from __future__ import annotations

import json
import pathlib

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.support.hf_reference import hf_greedy_fp8_kv
from tests.support.kv_fp8 import with_kv_scales
from tests.support.server import ServerProcess
from tests.support.tiny_models import random_prompts


@pytest.fixture(scope="module")
def fp8_server(tiny_model, tmp_path_factory):
    model = str(tmp_path_factory.mktemp("kv") / "scaled")
    scales = with_kv_scales(tiny_model, model)
    s = ServerProcess(model, "--kv-cache-dtype", "fp8", "--served-model-name", "tiny-fp8kv")
    try:
        yield s.wait_ready(), tiny_model, scales
    finally:
        s.stop()


def test_fp8_kv_completion_is_hf_greedy_on_rounded_kv(fp8_server):
    server, reference, scales = fp8_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = random_prompts(seed=9, lengths=[60])[0]
    expected = hf_greedy_fp8_kv(reference, [prompt], 16, torch.float8_e4m3fn, scales)[0]
    got = client.completions.create(
        model="tiny-fp8kv",
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert got.choices[0].token_ids == expected


def test_metrics_report_the_fp8_cache(fp8_server):
    server, reference, _ = fp8_server
    samples = {
        s.name: s for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text) for s in f.samples
    }
    info, reserved = samples["vllm:cache_config_info"], samples["kubellm_kv_cache_reserved_bytes"]
    assert info.labels["cache_dtype"] == "fp8"
    config = json.loads(pathlib.Path(reference, "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    block_bytes = 2 * config["num_hidden_layers"] * 16 * config.get("num_key_value_heads", heads) * head_dim  # 1 B
    assert reserved.value == (int(info.labels["num_gpu_blocks"]) + 1) * block_bytes


def test_unknown_kv_cache_dtype_stops_the_start_naming_the_flag(tiny_model):
    s = ServerProcess(tiny_model, "--kv-cache-dtype", "int8")
    try:
        code = s.proc.wait(timeout=60)
    finally:
        s.stop()
    assert code == 2
    assert "--kv-cache-dtype" in s.logs() and "invalid choice: 'int8'" in s.logs()
