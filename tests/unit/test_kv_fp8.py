"""--kv-cache-dtype fp8 on the CPU's torch path: the engine with an FP8 KV cache (the checkpoint's per-layer
scales, none of them 1) generates exactly what HF transformers generates when its keys and values are rounded
through FP8 with the same scales — under chunked prefill, prefix caching and both preemption modes; the cache
holds twice the blocks of a bf16 one in the same memory; and FP8 KV stays close to the unrounded model."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.model.attention import FP8_KV_DTYPES
from tests.support.hf_reference import hf_greedy, hf_greedy_fp8_kv
from tests.support.kv_fp8 import with_kv_scales
from tests.support.tiny_models import NEW_TOKENS, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize(
    ("arch", "kv_dtype", "mode"),
    [("qwen3", "fp8", "recompute"), ("llama", "fp8_e4m3", "swap"), ("qwen3", "fp8_e5m2", "swap")],
)
def test_fp8_kv_equals_hf_on_fp8_rounded_keys_and_values(tiny_models, tmp_path, arch, kv_dtype, mode):
    scaled = str(tmp_path / "scaled")
    scales = with_kv_scales(tiny_models[arch], scaled)
    prompts = random_prompts()
    base = random_prompts(seed=5, lengths=[170])[0]
    shares_prefix = base[:160] + [7, 8, 9]
    # 64-token chunks and 48 blocks of 16 for a batch that needs ~1,600 tokens: chunked prefill and preemption
    llm = LLM(
        scaled,
        kv_cache_dtype=kv_dtype,
        max_num_batched_tokens=64,
        block_size=16,
        num_gpu_blocks=48,
        preemption_mode=mode,
        num_cpu_blocks=256,
    )
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt in (base, shares_prefix):
        out = llm.generate([prompt], GREEDY)[0]
        got.append(out.outputs[0].token_ids)
    assert out.num_cached_tokens == 160  # base's FP8 blocks, read back by another sequence
    assert llm.engine.runner.kv_cache.dtype == FP8_KV_DTYPES[kv_dtype]
    layer = llm.engine.runner.model.model.layers[1].self_attn
    assert (layer.k_scale, layer.v_scale) == scales[1]
    prompts += [base, shares_prefix]
    expected = hf_greedy_fp8_kv(tiny_models[arch], prompts, NEW_TOKENS, FP8_KV_DTYPES[kv_dtype], scales)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} diverged"
    # the rounding is visible: the same model with an unrounded cache answers differently somewhere
    assert got != hf_greedy(tiny_models[arch], prompts, NEW_TOKENS)


def test_fp8_cache_holds_twice_the_blocks_of_bf16(tiny_model):
    budget = 1 << 20
    runners = {
        dtype: LLM(tiny_model, dtype="bfloat16", kv_cache_dtype=dtype, cpu_kv_cache_bytes=budget).engine.runner
        for dtype in ("auto", "fp8")
    }
    auto, fp8 = runners["auto"], runners["fp8"]
    assert auto.kv_cache.dtype == torch.bfloat16 and fp8.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.block_bytes * 2 == auto.block_bytes
    assert fp8.num_gpu_blocks == 2 * auto.num_gpu_blocks == 2 * (budget // auto.block_bytes)
    # the reserved bytes (kubellm_kv_cache_reserved_bytes) are the FP8 tensor's: the same budget
    assert fp8.kv_cache_bytes == fp8.kv_cache.numel() <= budget + fp8.block_bytes


def test_kv_cache_dtype_is_validated(tiny_model):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(tiny_model, kv_cache_dtype="int8")


def test_fp8_kv_stays_close_to_the_unrounded_cache(tiny_models):
    """A sanity bound on a tiny random model (fp32, scales 1.0): the teacher-forced prompt logprobs of an FP8
    cache drift little from an unrounded one's, and e4m3 (3 mantissa bits) less than e5m2 (2). Deterministic
    (seeded weights and prompts). Greedy agreement is not bounded here: a tiny random model's logits are so
    flat that bf16 vs fp32 alone changes most continuations; bench/fp8_quality.py measures it on SmolLM2."""
    prompts = random_prompts(seed=3, lengths=[40, 90, 200])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def logprobs(kv_dtype: str) -> torch.Tensor:
        outs = LLM(tiny_models["qwen3"], kv_cache_dtype=kv_dtype).generate(prompts, params)
        return torch.tensor([lp.logprob for out in outs for lp in out.prompt_logprobs])

    exact = logprobs("auto")
    e4m3, e5m2 = ((logprobs(kv) - exact).abs() for kv in ("fp8", "fp8_e5m2"))
    print(f"prompt logprob drift: e4m3 mean {e4m3.mean():.4f} max {e4m3.max():.4f}; e5m2 mean {e5m2.mean():.4f}")
    assert 0 < e4m3.mean() < 0.15 and e4m3.max() < 1.0
    assert e4m3.mean() < e5m2.mean()


def test_fp8_kv_on_two_tensor_parallel_ranks(tiny_models, tmp_path):
    """Each rank holds its KV heads in FP8 with the layer's (shared) scales; swapped blocks move as bytes."""
    scaled = str(tmp_path / "scaled")
    scales = with_kv_scales(tiny_models["qwen3"], scaled)
    prompts = random_prompts(lengths=[5, 64, 150, 300])
    llm = LLM(
        scaled,
        tensor_parallel_size=2,
        kv_cache_dtype="fp8",
        max_num_batched_tokens=64,
        block_size=16,
        num_gpu_blocks=24,
        preemption_mode="swap",
        num_cpu_blocks=128,
    )
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == hf_greedy_fp8_kv(tiny_models["qwen3"], prompts, NEW_TOKENS, torch.float8_e4m3fn, scales)
