"""Sampled requests (temperature > 0) with n-gram speculation keep plain decoding's output distribution.

The model is a bigram chain over four tokens with known logits (tests/support/tiny_models.py: bigram_model);
its output revisits them, so after the first output token (sampled by the prompt's step) every step has an
n-gram draft, right or wrong. Over N requests, the empirical joint distribution of the first four output tokens
is tested against the exact one — the chain of the probabilities the sampler draws each token from
(`probabilities`: temperature, min-p, top-k, top-p applied to HF's logits) — by Pearson's chi-square goodness of
fit: a correct sampler fails it with probability ALPHA (for any fixed engine seed, over the seeds one could
pick). Plain decoding must pass it (the control: the reference is what plain sampling draws), speculation must
pass it, and a deliberately wrong acceptance rule (every draft token accepted) must fail it."""

from __future__ import annotations

import json
from collections import Counter
from itertools import product

import pytest
import torch
from scipy.stats import chi2
from transformers import AutoModelForCausalLM

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.engine import runner
from kubellm.runtime.engine.sampler import probabilities
from kubellm.runtime.engine.sequence import Sequence
from tests.support.tiny_models import bigram_model

SUPPORT = A, B, C, D = [40, 41, 42, 43]
LOGITS = [  # row j: the logits over SUPPORT after SUPPORT[j]; the last row after any other token
    [0.0, 1.5, -0.5, 0.8],
    [1.0, 0.0, 1.2, -1.0],
    [-0.5, 0.5, 0.0, 1.5],
    [1.2, -0.3, 0.4, 0.0],
    [0.5, 0.0, 0.3, -0.2],
]
# 17 tokens: the requests share the first block of 16 (prefix cache), each computes one prompt token
PROMPT = [C, D, A, B, C, C, D, A, B, B, C, D, D, A, C, B, D]
NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1})
N = 2000
LENGTH = 4  # output tokens compared: the first, then the three of the second step's draft
ALPHA = 1e-4
CASES = {
    "temperature": SamplingParams(temperature=0.8, max_tokens=LENGTH + 1, ignore_eos=True),
    "filtered": SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, max_tokens=LENGTH + 1, ignore_eos=True),
}


@pytest.fixture(scope="module")
def bigram(tiny_model, tmp_path_factory) -> str:
    return bigram_model(tiny_model, str(tmp_path_factory.mktemp("bigram")), SUPPORT, LOGITS)


def exact_joint(model: str, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first LENGTH output tokens) after PROMPT: the chain of the sampler's per-token distributions, from HF's
    logits (the model is a bigram: checked on one longer context)."""
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        logits = torch.stack([hf(torch.tensor([[t]])).logits[0, -1] for t in SUPPORT])
        assert torch.allclose(hf(torch.tensor([PROMPT + [A]])).logits[0, -1], logits[0], atol=1e-5)
    seqs = [Sequence("reference", 0, [t], params, params.max_tokens) for t in SUPPORT]
    step = probabilities(logits, seqs)[:, SUPPORT].tolist()  # step[i][j]: P(SUPPORT[j] after SUPPORT[i])
    assert all(abs(sum(row) - 1) < 1e-6 for row in step)
    index = {t: i for i, t in enumerate(SUPPORT)}
    joint = {}
    for tokens in product(SUPPORT, repeat=LENGTH):
        p, last = 1.0, PROMPT[-1]
        for t in tokens:
            p *= step[index[last]][index[t]]
            last = t
        joint[tokens] = p
    return joint


def chi_square(counts: Counter, joint: dict[tuple[int, ...], float], n: int) -> tuple[float, float]:
    """Pearson's statistic over the cells (those expecting fewer than 5 pooled into one) and the value a
    correct sampler exceeds with probability ALPHA; a count in a cell of probability 0 is infinitely unlikely."""
    if any(counts[cell] for cell, p in joint.items() if p == 0) or set(counts) - set(joint):
        return float("inf"), 0.0
    cells = [(n * p, counts[cell]) for cell, p in joint.items() if n * p >= 5]
    small = [(n * p, counts[cell]) for cell, p in joint.items() if 0 < n * p < 5]
    if small:
        cells.append((sum(e for e, _ in small), sum(o for _, o in small)))
    stat = sum((o - e) ** 2 / e for e, o in cells)
    return stat, float(chi2.isf(ALPHA, len(cells) - 1))


def sample_joint(model: str, params: SamplingParams, speculative: bool) -> tuple[Counter, LLM]:
    llm = LLM(model, seed=1, max_num_seqs=1024, speculative_config=NGRAM if speculative else None)
    outputs = llm.generate([PROMPT] * N, params)
    return Counter(tuple(o.outputs[0].token_ids[:LENGTH]) for o in outputs), llm


@pytest.mark.parametrize("case", CASES)
def test_speculation_keeps_the_sampled_distribution(bigram, case):
    params = CASES[case]
    joint = exact_joint(bigram, params)
    plain, _ = sample_joint(bigram, params, speculative=False)
    stat, critical = chi_square(plain, joint, N)
    assert stat < critical, f"plain sampling: chi-square {stat:.1f} ≥ {critical:.1f}"

    counts, llm = sample_joint(bigram, params, speculative=True)
    stats = llm.engine.core.stats.spec
    # a draft at every request's second step, accepted in part: both acceptance and rejection happened
    assert stats.num_drafts >= N and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.accepted_per_position[1] > 0  # two in a row
    stat, critical = chi_square(counts, joint, N)
    assert stat < critical, f"speculation: chi-square {stat:.1f} ≥ {critical:.1f}"


def test_accepting_every_draft_fails_the_same_test(bigram, monkeypatch):
    """The test can fail: a runner that accepts the draft whatever was sampled is caught."""
    monkeypatch.setattr(runner, "accept", lambda draft, samples: draft + samples[len(draft) :])
    params = CASES["temperature"]
    counts, llm = sample_joint(bigram, params, speculative=True)
    assert llm.engine.core.stats.spec.num_accepted_tokens == llm.engine.core.stats.spec.num_draft_tokens
    stat, critical = chi_square(counts, exact_joint(bigram, params), N)
    assert stat > critical
