"""Sampler: penalties → greedy or (temperature → min-p → top-k → top-p → exponential-race sample); logprobs.

A seeded sequence draws its noise from its own generator, one vector per token, so its output does not
depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from kubellm.runtime.engine.sequence import Sequence, TokenLogprob


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        x = logits[row]
        if p.repetition_penalty != 1.0:  # HF/vLLM: over prompt and output tokens
            seen = torch.tensor(sorted(set(seq.token_ids)), device=x.device, dtype=torch.long)
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        out = seq.output_token_ids
        if out and (p.presence_penalty or p.frequency_penalty):  # OpenAI: over generated tokens only
            counts = torch.bincount(torch.tensor(out, device=x.device), minlength=x.shape[0])[: x.shape[0]].to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return logits


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside min-p, top-k and top-p, keeping at least the most likely one."""
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_k > 0 or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if top_k > 0:
            drop[top_k:] = True
        if top_p < 1.0:
            probs = torch.softmax(sorted_logits, dim=-1)
            drop |= (torch.cumsum(probs, dim=-1) - probs) > top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _noise(self, seq: Sequence, vocab: int) -> torch.Tensor:
        if seq.params.seed is None:
            return torch.empty(vocab, device=self.device).exponential_(generator=self.generator)
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.index)
        return torch.empty(vocab, device=self.device).exponential_(generator=seq.generator)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [len(seqs), vocab] fp32 → one token per sequence, plus logprobs where asked."""
        raw = logits
        if any(s.params.has_penalties for s in seqs):
            logits = _apply_penalties(logits.clone(), seqs)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        for i in random_rows:
            p = seqs[i].params
            row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = torch.softmax(row, dim=-1)
            tokens[i] = (probs / self._noise(seqs[i], probs.shape[0])).argmax()
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wanted:
            lp = torch.log_softmax(raw[wanted], dim=-1)
            k = max(seqs[i].params.logprobs for i in wanted)
            top_vals, top_ids = lp.topk(max(k, 1), dim=-1)
            chosen = lp.gather(1, tokens[wanted].unsqueeze(1)).squeeze(1).tolist()
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(wanted):
                n = seqs[i].params.logprobs
                logprobs[i] = TokenLogprob(token_list[i], chosen[j], list(zip(top_ids[j][:n], top_vals[j][:n])))
        return token_list, logprobs
