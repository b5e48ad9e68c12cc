"""Sampler: penalties, logit bias and grammar masks → greedy, or temperature → min-p → top-k → top-p →
exponential race, batched over rows.

Every sampled row draws one noise vector per token. A seeded sequence's noise for a token is a function of its
seed, its index (n > 1) and that token's index in the sequence only (`token_seed`), so its output depends neither
on what else is in the batch nor on how its tokens fall into steps: with n-gram speculation
(engine/speculation.py) a step decides several positions, and a seeded request gets exactly the tokens it gets
without speculation. The others share the engine's generator. On the CUDA
path a batch of greedy and temperature-only rows (the common case) is sampled by one fused Triton kernel
(Gumbel-max over the logits in one pass, triton_ops.sample).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kubellm.runtime.engine.guided import mask_disallowed
from kubellm.runtime.engine.sequence import Sequence
from kubellm.runtime.engine.wire import TokenLogprob
from kubellm.runtime.model.kernels import to_device, use_triton


@dataclass
class SampledTokens:
    """Tokens sampled on the device, and their copy on its way to the host (ready once `ready` is)."""

    tokens: torch.Tensor  # on the device: a step launched ahead reads its inputs here
    host: torch.Tensor
    logprobs: tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, chosen, top values, top ids
    ready: torch.cuda.Event | None


@dataclass
class PromptLogprobs:
    """Prompt logprobs of one step on their way to the host (Sampler.prompt_logprobs)."""

    spans: list[tuple[Sequence, int, int]]  # (sequence, first position, positions)
    targets: list[int]  # the prompt token each row scores
    host: tuple[torch.Tensor, ...]  # chosen logprob, rank, top values, top ids
    ready: torch.cuda.Event | None


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


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Add each row's logit_bias to its logits (OpenAI: before sampling, greedy included): one scatter."""
    rows, ids, bias = [], [], []
    for row, seq in enumerate(seqs):
        for token, value in seq.params.logit_bias.items():
            rows.append(row)
            ids.append(token)
            bias.append(value)
    index = (to_device(rows, logits.device), to_device(ids, logits.device))
    return logits.index_put_(index, to_device(bias, logits.device, logits.dtype), accumulate=True)


def _apply_restrictions(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """vLLM's allowed_token_ids (every other token masked) and min_tokens (EOS and stop tokens masked until
    that many tokens), in place."""
    for row in rows:
        seq = seqs[row]
        allowed = seq.params.allowed_token_ids
        if allowed is not None:
            index = to_device(allowed, logits.device)
            keep = logits[row, index]
            logits[row] = float("-inf")
            logits[row, index] = keep
        if seq.min_tokens_ban is not None and seq.num_output_tokens < seq.params.min_tokens:
            logits[row, to_device(seq.min_tokens_ban, logits.device)] = float("-inf")


def _filter(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's min-p, top-k and top-p; the most likely token always stays."""
    device, vocab = x.device, x.shape[1]
    min_p = [s.params.min_p for s in seqs]
    if any(min_p):
        probs = torch.softmax(x, dim=-1)
        floor = to_device(min_p, device, torch.float32)[:, None] * probs.max(dim=-1, keepdim=True).values
        x = x.masked_fill(probs < floor, float("-inf"))
    top_k = [s.params.top_k or vocab for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if min(top_k) < vocab or min(top_p) < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= to_device(top_k, device)[:, None]
        probs = torch.softmax(sorted_x, dim=-1)
        drop |= (torch.cumsum(probs, dim=-1) - probs) > to_device(top_p, device, torch.float32)[:, None]
        drop[:, 0] = False
        x = x.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    return x


_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _splitmix64(x: int) -> int:
    """SplitMix64's output function: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x + 0x9E37_79B9_7F4A_7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58_476D_1CE4_E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D0_49BB_1331_11EB) & _U64
    return x ^ (x >> 31)


def token_seed(seed: int, index: int, position: int) -> int:
    """The seed of the noise deciding token `position` of sequence `index` of a request seeded `seed`
    (a few microseconds: it runs for every seeded row of every step)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _U64) ^ index) ^ position) >> 1


def _temperature_only(p) -> bool:
    """Rows the fused Triton sampler takes: greedy or temperature only. Filters need a sort; a seeded row's
    noise is its own (`token_seed`), drawn on the torch path."""
    return p.seed is None and p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0


def probabilities(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The distribution a non-greedy row is sampled from: fp32 logits → temperature → min-p, top-k, top-p."""
    temps = to_device([s.params.temperature for s in seqs], logits.device, torch.float32)[:, None]
    return torch.softmax(_filter(logits / temps, seqs), dim=-1)


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.host_rng = random.Random(seed)  # a fresh seed per step for the fused Triton sampler
        self.seeded = torch.Generator(device=device)  # reseeded for every token of a seeded sequence

    def _noise(self, seqs: list[Sequence], vocab: int, positions: list[int] | None) -> torch.Tensor:
        noise = torch.empty(len(seqs), vocab, device=self.device).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                position = len(seq) if positions is None else positions[row]
                self.seeded.manual_seed(token_seed(seq.params.seed, seq.index, position))
                noise[row].exponential_(generator=self.seeded)
        return noise

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [len(seqs), vocab] (any float dtype) → one token per sequence, plus logprobs where asked."""
        return self.to_host(self.sample(logits, seqs), seqs)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], positions: list[int] | None = None) -> SampledTokens:
        """Queue the sampling of one token per row (and the logprobs asked for), and their copy to the host;
        nothing here waits for the device. positions: the index in its sequence of the token each row decides
        (None: the next one, len(seq)); it keys a seeded sequence's noise."""
        raw = logits  # the model's dtype; widened exactly (bf16 → fp32) wherever arithmetic follows
        penalties, bias = any(s.params.has_penalties for s in seqs), any(s.params.logit_bias for s in seqs)
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        restricted = [i for i, s in enumerate(seqs) if s.restricted]
        if penalties or bias or guided or restricted:
            logits = raw.to(torch.float32, copy=True)
            if penalties:
                logits = _apply_penalties(logits, seqs)
            if bias:
                logits = _apply_logit_bias(logits, seqs)
            if restricted:
                _apply_restrictions(logits, seqs, restricted)
            if guided:  # last: no bias may bring back a token the grammar forbids
                mask_disallowed(logits, guided, [seqs[i].matcher for i in guided])
        if use_triton() and all(_temperature_only(s.params) for s in seqs):
            from kubellm.runtime.model import triton_ops

            temps = to_device([s.params.temperature for s in seqs], logits.device, torch.float32)
            tokens = triton_ops.sample(logits, temps, self.host_rng.getrandbits(31))  # widens as it reads
        else:
            tokens = self._sample_torch(logits.float(), seqs, positions)
        logprobs = None
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wanted:
            lp = torch.log_softmax(raw[wanted].float(), dim=-1)
            k = max(seqs[i].params.logprobs for i in wanted)
            top_vals, top_ids = lp.topk(max(k, 1), dim=-1)
            chosen = lp.gather(1, tokens[wanted].unsqueeze(1)).squeeze(1)
            logprobs = (wanted, *(t.to("cpu", non_blocking=True) for t in (chosen, top_vals, top_ids)))
        if not tokens.is_cuda:
            return SampledTokens(tokens, tokens, logprobs, None)
        host = tokens.to("cpu", non_blocking=True)  # into pinned memory, in stream order
        ready = torch.cuda.Event()
        ready.record()
        return SampledTokens(tokens, host, logprobs, ready)

    @torch.inference_mode()
    def prompt_logprobs(self, logits: torch.Tensor, spans: list[tuple[Sequence, int, int]]) -> PromptLogprobs:
        """Queue the logprobs of prompt tokens: logits row r is position q of a span (seq, first, count), and
        scores prompt token q + 1 (its logprob, its rank, and the top prompt_logprobs alternatives)."""
        targets = [t for seq, first, count in spans for t in seq.token_ids[first + 1 : first + 1 + count]]
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(1, to_device(targets, lp.device).unsqueeze(1))
        rank = (lp > chosen).sum(dim=-1) + 1
        k = max(seq.params.prompt_logprobs for seq, _, _ in spans)
        top_vals, top_ids = lp.topk(max(k, 1), dim=-1)
        host = tuple(t.to("cpu", non_blocking=True) for t in (chosen.squeeze(1), rank, top_vals, top_ids))
        ready = None
        if lp.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return PromptLogprobs(spans, targets, host, ready)

    @staticmethod
    def prompt_logprobs_to_host(pending: PromptLogprobs) -> None:
        """Append each span's prompt logprobs to its sequence."""
        if pending.ready is not None:
            pending.ready.synchronize()
        chosen, rank, top_vals, top_ids = (t.tolist() for t in pending.host)
        row = 0
        for seq, _first, count in pending.spans:
            n = seq.params.prompt_logprobs
            out = seq.prompt_logprobs
            for r in range(row, row + count):
                out.append(
                    TokenLogprob(pending.targets[r], chosen[r], list(zip(top_ids[r][:n], top_vals[r][:n])), rank[r])
                )
            row += count

    def _sample_torch(
        self, logits: torch.Tensor, seqs: list[Sequence], positions: list[int] | None = None
    ) -> torch.Tensor:
        """Greedy rows take the argmax; the others are drawn from `probabilities` by dividing them by
        exponential noise (an exponential race: row i wins with probability p_i)."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            picked = [seqs[i] for i in rows]
            index = to_device(rows, logits.device)
            probs = probabilities(logits[index], picked)
            noise = self._noise(picked, probs.shape[1], None if positions is None else [positions[i] for i in rows])
            tokens[index] = (probs / noise).argmax(dim=-1)
        return tokens

    @staticmethod
    def to_host(sampled: SampledTokens, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for these tokens only (not for steps queued after them), with the GIL released."""
        if sampled.ready is not None:
            sampled.ready.synchronize()
        token_list = sampled.host.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if sampled.logprobs is not None:
            wanted, chosen, top_vals, top_ids = sampled.logprobs
            chosen, top_vals, top_ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(wanted):
                n = seqs[i].params.logprobs
                logprobs[i] = TokenLogprob(token_list[i], chosen[j], list(zip(top_ids[j][:n], top_vals[j][:n])))
        return token_list, logprobs
