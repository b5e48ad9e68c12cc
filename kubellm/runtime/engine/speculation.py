"""Speculative decoding by n-gram prompt lookup (vLLM's `--speculative-config '{"method": "ngram", ...}'`): no
draft model. For a decoding sequence, the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are
looked up earlier in its own tokens — prompt and output — and the tokens that followed the most recent match are
the draft d_1 … d_k. One forward then computes the last token and the draft as a (k + 1)-token chunk, whose rows
give the model's distribution p_i for each draft position (p_i: given the tokens before and d_1 … d_{i-1}) and
p_{k+1} after the whole draft; 1 … k + 1 tokens per step.

Verification is rejection sampling with a deterministic draft (Leviathan et al. 2023; vLLM's rejection sampler
without draft probabilities): accept d_i with probability p_i(d_i); at the first rejection, the token is drawn
from p_i with d_i removed and renormalised (max(p_i - onehot(d_i), 0)), and the step ends; if every draft token is
accepted, the token after them is drawn from p_{k+1}. Each position's output is then distributed exactly as
plain decoding's. It is done here by sampling every position as plain decoding samples it — the same sampler,
the same processing (temperature, min-p, top-k, top-p, logit bias), the exponential race t_i = argmax p_i / E_i —
and accepting d_i when t_i == d_i, else taking t_i and stopping (`accept`). That is the same rule: the race
picks d_i with probability p_i(d_i), and the winner among the other tokens is independent of whether it beat
d_i, so a rejection yields t_i ~ p_i without d_i, renormalised. Greedy requests (temperature 0) take the argmax
at every position: the exact tokens greedy decoding gives one at a time. The draft positions of every
speculating sequence are one batch of rows of one sampler call, on the device, in the same step as the
sequences that do not speculate.

Seeds: vLLM draws a seeded request's acceptance and recovery from the request's own generator, so its output is
reproducible for one configuration but differs from its output without speculation. Here a seeded sequence's
noise for a position depends only on its seed, its index and that position (engine/sampler.py `token_seed`),
so a seeded request gets exactly the tokens it gets without speculation, and the same tokens again.

Requests with logprobs, penalties, grammars or token restrictions (allowed_token_ids, min_tokens) do not
speculate: their processing of draft position i would need the output as if d_1 … d_{i-1} were accepted
(penalties, min_tokens, the grammar's state), and logprobs would need every accepted position's row; they
decode one token per step as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kubellm.runtime.engine.sequence import Sequence


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix of `tokens`
    (n_max … n_min tokens long) found; [] when none occurs."""
    length = len(tokens)
    if k < 1 or length <= n_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # windows starting at 0 … length-n-1 (each has at least one token after it), compared with the suffix
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[length - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return []


def can_speculate(seq: Sequence) -> bool:
    """Whether the sampler draws each draft position as it would draw that token without speculation: the
    processing of its logits does not depend on the tokens before it."""
    p = seq.params
    return p.logprobs is None and not p.has_penalties and seq.matcher is None and not seq.restricted


def draft_rows(seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """The draft positions of speculating sequences as sampler rows, in order: each row's sequence and the
    index of the token it decides (draft position i of a sequence decides token len(seq) + i)."""
    rows, positions = [], []
    for seq in seqs:
        for i in range(len(seq.draft_token_ids)):
            rows.append(seq)
            positions.append(len(seq) + i)
    return rows, positions


def accept(draft: list[int], targets: list[int]) -> list[int]:
    """targets[i]: the token sampled after the last token and draft[:i] (len(draft) + 1 of them) → the tokens
    this step yields: the draft's prefix the samples agree with, then the first sample that differs (or,
    the whole draft accepted, the last)."""
    a = 0
    while a < len(draft) and draft[a] == targets[a]:
        a += 1
    return draft[:a] + [targets[a]]


@dataclass
class SpecDecodeStats:
    """vLLM's spec_decode counters: drafts proposed, their tokens, the tokens accepted (and at each position)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, draft_len: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += draft_len
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < draft_len:
            self.accepted_per_position.extend([0] * (draft_len - len(self.accepted_per_position)))
        for i in range(accepted):
            self.accepted_per_position[i] += 1
