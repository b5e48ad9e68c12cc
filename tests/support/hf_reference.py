"""HF transformers as the reference: greedy continuations of token-id prompts, one prompt at a time."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = _load(model_dir)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=3,
            )
            out = gen[0, len(p) :].tolist()
            assert len(out) == max_new_tokens, "HF stopped early: compare with ignore_eos only on full runs"
            outs.append(out)
    return outs
