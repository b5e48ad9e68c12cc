"""Speculative decoding by n-gram prompt lookup (vLLM's `--speculative-config '{"method": "ngram", ...}'`): no
draft model. For a decoding sequence, the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are
looked up earlier in its own tokens — prompt and output — and the tokens that followed the most recent match are
the draft. One forward then computes the last token and the k draft tokens as a (k + 1)-token chunk; the draft is
accepted up to the first position where the model's own greedy choice differs, and that choice (or, when the
whole draft is accepted, the token after it) comes for free: 1 … k + 1 tokens per step, exactly the tokens greedy
decoding would produce one at a time.

Only greedy requests without logprobs, penalties, logit bias, grammars or token restrictions speculate; the
others decode one token per step as usual (sampling with temperature > 0 is not speculated: that would need
rejection sampling against the draft's distribution, which a lookup does not have).
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
    """Whether the draft's acceptance (the model's argmax) is exactly what the sampler would pick."""
    p = seq.params
    return (
        p.greedy
        and p.logprobs is None
        and not p.has_penalties
        and not p.logit_bias
        and seq.matcher is None
        and not seq.restricted
    )


def accept(draft: list[int], targets: list[int]) -> list[int]:
    """targets[i]: the model's token after the last token and draft[:i] (len(draft) + 1 of them) → the tokens
    this step yields: the draft's agreeing prefix, then the model's own next token."""
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
