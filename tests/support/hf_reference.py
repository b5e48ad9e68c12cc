"""HF transformers as the reference: greedy continuations of token-id prompts, one prompt at a time."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt alone through an HF (or PEFT) model's greedy generate; EOS does not stop it."""
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=3,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outs = generate_greedy(_load(model_dir), prompts, max_new_tokens)
    assert all(len(o) == max_new_tokens for o in outs), "HF stopped early: compare with ignore_eos only on full runs"
    return outs


def hf_prompt_logprobs(model_dir: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i = 1 … (the first token has none), from HF transformers in float32."""
    model = _load(model_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """HF's SDPA attention on keys and values rounded through an FP8 KV cache: K / k_scale in FP8 (saturated,
    nearest even), back times k_scale; V alike. The HF cache keeps exact values, and rounding them again at
    every step gives the same values a cache that stores them rounded gives."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype, k_scale, v_scale = module.fp8_kv
    limit = torch.finfo(dtype).max

    def rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
        return ((x.float() * (1.0 / scale)).clamp(-limit, limit).to(dtype).float() * scale).to(x.dtype)

    return sdpa_attention_forward(
        module, query, rounded(key, k_scale), rounded(value, v_scale), attention_mask, **kwargs
    )


def hf_greedy_fp8_kv(
    model_dir: str, prompts: list[list[int]], max_new_tokens: int, dtype: torch.dtype, scales: list[tuple[float, float]]
) -> list[list[int]]:
    """hf_greedy with every layer's keys and values rounded as an FP8 KV cache of `dtype` holds them, with that
    layer's (k_scale, v_scale)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("fp8_kv_reference", _fp8_kv_attention)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="fp8_kv_reference"
    ).eval()
    for layer, (k_scale, v_scale) in zip(model.model.layers, scales, strict=True):
        layer.self_attn.fp8_kv = (dtype, k_scale, v_scale)
    return generate_greedy(model, prompts, max_new_tokens)
