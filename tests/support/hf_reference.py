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


def hf_prompt_logprobs(model_dir: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i = 1 … (the first token has none), from HF transformers in float32."""
    model = _load(model_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
