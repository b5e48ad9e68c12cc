"""Our greedy output equals HF transformers' token for token, under chunked prefill and both preemption modes."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from tests.support.hf_reference import hf_greedy
from tests.support.tiny_models import ARCHITECTURES, NEW_TOKENS, random_prompts

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf_with_chunked_prefill_and_preemption(tiny_models, arch, mode, device):
    prompts = random_prompts()
    expected = hf_greedy(tiny_models[arch], prompts, NEW_TOKENS)
    # 64-token budget: every prompt over 64 tokens is prefilled in chunks. 48 blocks of 16 tokens hold
    # 768 tokens, far less than the ~1,600 the batch needs at once: preemption is forced.
    llm = LLM(
        tiny_models[arch],
        max_num_batched_tokens=64,
        block_size=16,
        num_gpu_blocks=48,
        preemption_mode=mode,
        num_cpu_blocks=256,
        device=device,
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    assert llm.engine.scheduler.num_preemptions > 0
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (length {len(prompts[i])}) diverged"
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert len(bm.cpu_free) == bm.num_cpu_blocks


def test_string_prompts_and_text_match_hf_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "Hello world! Tell me a story about a dragon."
    ids = tok(prompt).input_ids
    expected = hf_greedy(tiny_model, [ids], 16)[0]
    out = LLM(tiny_model).generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == tok.decode(expected, skip_special_tokens=True)
    assert out.outputs[0].finish_reason == "length"


def test_large_prefill_chunks_match_hf(tiny_model):
    """Chunks too big for an explicit mask take SDPA's fused paths: plain causal (nothing cached before the
    chunk) and a bottom-right causal bias (after a prefix-cache hit). Both must stay exact."""
    long_prompt = random_prompts(seed=21, lengths=[1100])[0]
    shares_prefix = long_prompt[:512] + random_prompts(seed=22, lengths=[1000])[0]
    expected = hf_greedy(tiny_model, [long_prompt, shares_prefix], 8)
    llm = LLM(tiny_model, max_num_batched_tokens=2048, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([long_prompt], params)[0]  # 1100 × 1100 query×key: is_causal
    second = llm.generate([shares_prefix], params)[0]  # 1000 new × 1512 keys after a 512-token hit
    assert second.num_cached_tokens == 512
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected
