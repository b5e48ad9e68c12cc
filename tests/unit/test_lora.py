"""LoRA adapters (PEFT format) in the engine: greedy outputs equal HF transformers + PEFT for batches that mix
the base model and two adapters, on every architecture; the limits; the prefix cache keeps adapters apart."""

from __future__ import annotations

import random

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.model.lora import LoraError
from tests.support.lora import ATTENTION, make_adapter, peft_greedy
from tests.support.tiny_models import ARCHITECTURES, random_prompts

NEW = 16
DEVICES = [
    "cpu",
    pytest.param(  # the same torch path on the GPU (Triton attention, no CUDA graphs while LoRA is on)
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]
    ),
]


MOE = ("qwen3_moe", "mixtral")  # adapters on their attention only: LoRA on experts is not supported


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per architecture two adapters: rank 8 on all seven projections; rank 4 (rsLoRA) on q/v/down only (on MoE
    models: on q/k/v/o, and on q/v)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, model in tiny_models.items():
        moe = arch in MOE
        out[arch] = {
            "all8": make_adapter(
                model, str(root / arch / "all8"), rank=8, seed=1, **({"targets": ATTENTION} if moe else {})
            ),
            "qvd4": make_adapter(
                model,
                str(root / arch / "qvd4"),
                rank=4,
                targets=("q_proj", "v_proj") if moe else ("q_proj", "v_proj", "down_proj"),
                use_rslora=True,
                seed=2,
            ),
        }
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_adapter_batch_matches_peft(tiny_models, adapters, arch, device):
    model = tiny_models[arch]
    prompts = random_prompts(seed=5, lengths=[3, 17, 40, 9, 64, 33, 1, 120, 25])
    names = [None, "all8", "qvd4"] * 3  # base and both adapters in every step
    paths = {None: None, **adapters[arch]}
    base = peft_greedy(model, None, prompts, NEW)
    expected = [None] * len(prompts)
    for name in paths:
        mine = [i for i, n in enumerate(names) if n == name]
        for i, out in zip(mine, peft_greedy(model, paths[name], [prompts[i] for i in mine], NEW)):
            expected[i] = out
    for name in ("all8", "qvd4"):  # an adapter that changed nothing would prove nothing
        assert any(expected[i] != base[i] for i, n in enumerate(names) if n == name), f"{name} is a no-op"
    llm = LLM(
        model,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        lora_modules=[f"{n}={p}" for n, p in adapters[arch].items()],
        max_num_batched_tokens=64,  # chunked prefill: prompt chunks and decodes of every adapter in one step
        device=device,
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), lora=names)
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} ({names[i] or 'base'}) diverged from HF + PEFT"
    assert llm.engine.num_steps_ahead > 0  # decode steps launched ahead (async scheduling) ran adapters too


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_adapters_survive_preemption(tiny_models, adapters, mode):
    """48 blocks of 16 tokens for a batch that needs far more: sequences of every adapter are preempted and
    come back (recomputed, or swapped in) under their own adapter."""
    model = tiny_models["llama"]
    prompts = random_prompts(seed=6, lengths=[150, 200, 120, 180, 90, 160])
    names = [None, "all8", "qvd4"] * 2
    paths = {None: None, **adapters["llama"]}
    expected = [peft_greedy(model, paths[n], [p], NEW)[0] for n, p in zip(names, prompts)]
    llm = LLM(
        model,
        enable_lora=True,
        max_loras=2,
        lora_modules=[f"{n}={p}" for n, p in adapters["llama"].items()],
        max_num_batched_tokens=64,
        block_size=16,
        num_gpu_blocks=48,
        preemption_mode=mode,
        num_cpu_blocks=256,
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), lora=names)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_prefix_cache_keeps_adapters_apart(tiny_models, adapters):
    model = tiny_models["llama"]
    llm = LLM(model, enable_lora=True, max_loras=2, lora_modules=[f"{n}={p}" for n, p in adapters["llama"].items()])
    prompt = random_prompts(seed=9, lengths=[80])[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    base = llm.generate([prompt], params)[0]
    under_a = llm.generate([prompt], params, lora="all8")[0]
    again = llm.generate([prompt], params, lora="all8")[0]
    base_again = llm.generate([prompt], params)[0]
    assert under_a.num_cached_tokens == 0  # the base model's KV is no hit for an adapter
    assert again.num_cached_tokens == 64 and base_again.num_cached_tokens == 64  # each hits its own
    assert again.outputs[0].token_ids == under_a.outputs[0].token_ids != base.outputs[0].token_ids
    assert base_again.outputs[0].token_ids == base.outputs[0].token_ids


def test_limits_name_the_field(tiny_models, adapters, tmp_path):
    model = tiny_models["llama"]
    llm = LLM(model, enable_lora=True, max_loras=1, max_lora_rank=4)
    with pytest.raises(LoraError, match="max-lora-rank") as e:
        llm.engine.load_lora("big", adapters["llama"]["all8"])  # rank 8 > 4
    assert e.value.field == "max_lora_rank"
    with pytest.raises(LoraError) as e:
        llm.engine.load_lora("missing", str(tmp_path))
    assert e.value.field == "lora_path" and "adapter_config.json" in str(e.value)
    llm.engine.load_lora("small", adapters["llama"]["qvd4"])
    with pytest.raises(LoraError) as e:
        llm.engine.load_lora("second", adapters["llama"]["qvd4"])
    assert e.value.field == "max_loras"
    with pytest.raises(LoraError) as e:
        llm.engine.load_lora("small", adapters["llama"]["qvd4"])
    assert e.value.field == "lora_name"
    with pytest.raises(LoraError, match="not loaded"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), lora="nope")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    before = llm.generate([[5, 6, 7]], params, lora="small")[0].outputs[0].token_ids
    llm.engine.unload_lora("small")
    llm.engine.load_lora("other", adapters["llama"]["qvd4"])  # the freed slot is reused
    assert llm.generate([[5, 6, 7]], params, lora="other")[0].outputs[0].token_ids == before
    with pytest.raises(LoraError) as e:
        llm.engine.unload_lora("small")
    assert e.value.field == "lora_name"


def test_adapter_of_another_model_is_refused(tiny_models, adapters):
    llm = LLM(tiny_models["qwen3"], enable_lora=True, max_lora_rank=8)  # head_dim differs from llama's
    with pytest.raises(LoraError, match="do not fit"):
        llm.engine.load_lora("wrong", adapters["llama"]["all8"])


def test_adapters_with_ngram_speculation(tiny_models, adapters):
    """Drafts verified under each sequence's adapter: the output is still HF + PEFT's."""
    model = tiny_models["llama"]
    rng = random.Random(7)
    prompts = [[rng.randrange(4, 500) for _ in range(n)] * 3 for n in (4, 9, 12, 6, 8, 10)]
    names = [None, "all8", "qvd4"] * 2
    paths = {None: None, **adapters["llama"]}
    expected = [peft_greedy(model, paths[n], [p], NEW)[0] for n, p in zip(names, prompts)]
    llm = LLM(
        model,
        enable_lora=True,
        max_loras=2,
        lora_modules=[f"{n}={p}" for n, p in adapters["llama"].items()],
        speculative_config='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}',
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), lora=names)
    assert llm.engine.core.stats.spec.num_drafts > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
