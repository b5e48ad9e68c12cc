"""The fit check (kubellm/fit.py): its estimate against published model sizes, the refusal's numbers, and the
runtime refusing at start (offline here; `kubellm serve`'s exit code and termination message in
tests/e2e/test_fit_refusal.py)."""

from __future__ import annotations

import json

import pytest

from kubellm import fit
from kubellm.runtime import LLM
from tests.support.model_configs import LLAMA_3_1_8B as LLAMA_3_8B

GIB = 1 << 30
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B: 128 experts of 768 columns, 8 active
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_parameter_counts_match_the_published_sizes():
    assert sum(fit.parameter_counts(LLAMA_3_8B)) / 1e9 == pytest.approx(8.03, abs=0.01)
    assert sum(fit.parameter_counts(QWEN3_30B_A3B)) / 1e9 == pytest.approx(30.5, abs=0.1)


def test_llama_8b_fits_an_h100_not_a_16_gib_gpu_and_the_message_has_the_numbers():
    h100 = fit.estimate(LLAMA_3_8B, 80 * GIB, max_model_len=8192)
    assert h100.weights_bytes == pytest.approx(16.06e9, rel=0.01)
    assert h100.kv_bytes == 2 * 32 * 8 * 128 * 8192 * 2  # 1 GiB: K and V, 32 layers, 8 heads of 128, bf16
    assert h100.fits
    small = fit.estimate(LLAMA_3_8B, 16 * GIB, max_model_len=8192)
    assert not small.fits
    message = small.message()
    for number in ("weights 14.96 GiB", "8192-token sequence 1.00 GiB", "14.40 GiB usable", "of 16.00 GiB"):
        assert number in message
    assert fit.estimate(LLAMA_3_8B, 16 * GIB, max_model_len=8192, tensor_parallel_size=2).fits  # half each
    fp8 = fit.estimate({**LLAMA_3_8B, "quantization_config": {"quant_method": "fp8"}}, 16 * GIB, max_model_len=8192)
    assert fp8.weights_bytes < 0.6 * small.weights_bytes and fp8.fits
    # quantized at load (--quantization fp8): the same bytes as the FP8 checkpoint
    dynamic = fit.estimate(LLAMA_3_8B, 16 * GIB, max_model_len=8192, quantization="fp8")
    assert dynamic.weights_bytes == fp8.weights_bytes and dynamic.fits
    # a GPU without FP8 matmuls (Ampere and older) holds them dequantized, in bf16: the dense model's bytes
    ampere = fit.estimate(
        {**LLAMA_3_8B, "quantization_config": {"quant_method": "fp8"}}, 16 * GIB, max_model_len=8192, fp8_matmuls=False
    )
    assert ampere.weights_bytes == small.weights_bytes and not ampere.fits


def test_the_full_context_counts_when_max_model_len_is_unset():
    assert fit.estimate(LLAMA_3_8B, 80 * GIB).kv_bytes == 16 * GIB  # 131072 tokens × 128 KiB
    assert not fit.estimate(LLAMA_3_8B, 24 * GIB).fits


def test_a_kwok_gpu_node_label_gives_the_memory_the_operator_checks_against():
    node = {"nvidia.com/gpu.memory": "24576", "nvidia.com/gpu.product": "NVIDIA-L4"}  # MiB, as GFD writes it
    memory = fit.node_gpu_memory_bytes(node)
    assert memory == 24 * GIB
    assert not fit.estimate(LLAMA_3_8B, memory, max_model_len=131072).fits  # 16 GiB of KV alone
    assert fit.estimate(LLAMA_3_8B, memory, max_model_len=8192).fits
    assert fit.node_gpu_memory_bytes({}) is None and fit.node_gpu_memory_bytes({"nvidia.com/gpu.memory": "n/a"}) is None


def test_termination_message_round_trips_within_kubernetes_limit():
    text = fit.termination_message(fit.estimate(QWEN3_30B_A3B, 24 * GIB))
    assert len(text.encode()) < 4096
    parsed = fit.parse_termination_message(text)
    assert parsed["reason"] == "InsufficientGPUMemory" and parsed["needed_bytes"] > parsed["usable_bytes"]
    assert parsed["message"].startswith("the model does not fit")
    assert fit.parse_termination_message("OOMKilled") is None
    assert fit.parse_termination_message(json.dumps({"reason": "Other"})) is None


def test_the_engine_refuses_to_start_with_a_budget_too_small(tiny_model):
    needed = fit.estimate(fit.read_config(tiny_model), 1, fixed_overhead_bytes=0, max_model_len=2048).needed_bytes
    with pytest.raises(fit.DoesNotFit, match="the model does not fit: weights"):
        LLM(tiny_model, device="cpu", device_memory_bytes=needed // 2)
    llm = LLM(tiny_model, device="cpu", device_memory_bytes=4 * needed)  # fits: starts and serves
    assert llm.generate([[5, 6]])[0].outputs[0].token_ids


def test_the_engine_counts_fp8_weights_as_the_device_holds_them(tiny_model):
    """--quantization fp8 where there are no FP8 matmuls (here: the CPU) holds the weights dequantized: a budget
    that the FP8 bytes would fit but the dequantized ones do not is refused before loading."""
    config = fit.read_config(tiny_model)
    kw = dict(dtype="bfloat16", quantization="fp8", fixed_overhead_bytes=0, max_model_len=2048)
    fp8_held = fit.estimate(config, 1, **kw).needed_bytes
    dequantized = fit.estimate(config, 1, **kw, fp8_matmuls=False).needed_bytes
    assert fp8_held < dequantized
    budget = int((fp8_held + dequantized) / 2 / 0.9)  # usable = 90%: between the two
    with pytest.raises(fit.DoesNotFit, match="the model does not fit"):
        LLM(tiny_model, device="cpu", dtype="bfloat16", quantization="fp8", device_memory_bytes=budget)
