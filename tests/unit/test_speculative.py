"""N-gram speculative decoding (--speculative-config, method ngram): greedy output is exactly HF's and exactly
what plain decoding gives — drafts mostly rejected (random tiny models) or mostly accepted (a model whose output
cycles), through chunked prefill and both preemption modes; stops inside an accepted draft; sampled requests
speculate and a seeded one draws exactly what it draws without speculation (the distribution of unseeded ones:
test_speculative_sampling.py); the settings are vLLM's JSON, checked."""

from __future__ import annotations

import random

import pytest

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.engine.speculation import accept, propose_ngram
from kubellm.settings import SpeculativeConfig
from tests.support.hf_reference import hf_greedy
from tests.support.tiny_models import bigram_model, looping_model, random_prompts

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def looping(tiny_models, tmp_path_factory) -> str:
    return looping_model(tiny_models["llama"], str(tmp_path_factory.mktemp("looping")))


@pytest.fixture(scope="module")
def bigram(tiny_models, tmp_path_factory) -> str:
    """Sampled output over four tokens: n-gram drafts on nearly every step, right about half the time."""
    logits = [[0.0, 1.5, -0.5, 0.8], [1.0, 0.0, 1.2, -1.0], [-0.5, 0.5, 0.0, 1.5], [1.2, -0.3, 0.4, 0.0], [0, 0, 0, 0]]
    return bigram_model(tiny_models["llama"], str(tmp_path_factory.mktemp("bigram")), [40, 41, 42, 43], logits)


def prompts_with_repeats() -> list[list[int]]:
    rng = random.Random(3)
    repeated = [[rng.randrange(4, 500) for _ in range(n)] * 3 for n in (4, 9, 30)]
    return repeated + random_prompts(seed=4, lengths=[1, 7, 40, 90, 130])


def run(model: str, prompts, params: SamplingParams | list[SamplingParams], **options) -> tuple[list, LLM]:
    # 64-token chunks and 40 blocks of 16 (640 tokens) for a batch needing ~1,000: chunked prefill, preemption
    llm = LLM(model, max_num_batched_tokens=64, block_size=16, num_gpu_blocks=40, num_cpu_blocks=256, **options)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)], llm


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("model_name", ["qwen3", "looping"])
def test_greedy_output_is_hf_and_plain_decoding(tiny_models, looping, model_name, mode):
    model = looping if model_name == "looping" else tiny_models[model_name]
    prompts = prompts_with_repeats()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got, llm = run(model, prompts, params, preemption_mode=mode, speculative_config=NGRAM)
    plain, _ = run(model, prompts, params, preemption_mode=mode)
    assert got == plain == hf_greedy(model, prompts, NEW_TOKENS)
    stats = llm.engine.core.stats.spec
    assert llm.engine.scheduler.num_preemptions > 0 and stats.num_drafts > 0
    if model_name == "looping":  # whole drafts accepted: steps of several tokens
        assert stats.accepted_per_position[3] > 0 and stats.num_accepted_tokens > stats.num_draft_tokens // 4
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(bm.cpu_free) == bm.num_cpu_blocks


def test_stop_token_inside_an_accepted_draft(looping):
    """A stop token accepted mid-draft ends the sequence there: the draft's tokens after it are dropped."""
    prompts = prompts_with_repeats()[:3]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    full, _ = run(looping, prompts, params)
    stops = [
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=[out[-5]]) for out in full
    ]
    got, llm = run(looping, prompts, stops, speculative_config=NGRAM)
    assert got == [out[: out.index(out[-5]) + 1] for out in full]
    assert llm.engine.core.stats.spec.num_accepted_tokens > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_seeded_sampled_requests_draw_what_plain_decoding_draws(bigram, mode):
    """temperature > 0 speculates (rejection sampling, engine/speculation.py); a seeded request's noise is keyed
    by token position, so it draws exactly the tokens it draws without speculation — with filters, logit bias
    and n > 1, batched with a greedy request, through chunked prefill and preemption."""
    prompts = prompts_with_repeats()
    params = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, seed=8, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=-9, logit_bias={41: 1.5}, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=10, n=2, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0, logit_bias={42: 3.0}, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.6, seed=11, stop_token_ids=[43], max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=1.2, seed=12, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=13, top_p=0.8, max_tokens=NEW_TOKENS, ignore_eos=True),
    ]
    llm = LLM(
        bigram,
        max_num_batched_tokens=64,
        block_size=16,
        num_gpu_blocks=40,
        num_cpu_blocks=256,
        preemption_mode=mode,
        speculative_config=NGRAM,
    )
    got = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    plain = LLM(
        bigram, max_num_batched_tokens=64, block_size=16, num_gpu_blocks=40, num_cpu_blocks=256, preemption_mode=mode
    )
    assert got == [[c.token_ids for c in o.outputs] for o in plain.generate(prompts, params)]
    stats = llm.engine.core.stats.spec
    # the greedy request accepts at most NEW_TOKENS draft tokens: the sampled ones speculated too
    assert llm.engine.scheduler.num_preemptions > 0 and stats.num_accepted_tokens > NEW_TOKENS
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # and drafts were rejected


def test_ngram_lookup_and_acceptance():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3], 2, 3, 1) == [9, 1]  # the 3-gram [1, 2, 3] occurred before
    assert propose_ngram([5, 1, 2, 7, 1, 2, 8, 1, 2], 3, 2, 1) == [8, 1, 2]  # the most recent occurrence
    assert propose_ngram([4, 5, 6], 3, 3, 1) == []
    assert propose_ngram([7, 7], 4, 3, 2) == []  # shorter than prompt_lookup_min + 1
    assert accept([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert accept([1, 2, 3], [1, 5, 3, 4]) == [1, 5]
    assert accept([1], [6, 1]) == [6]


@pytest.mark.parametrize(
    "text, error",
    [
        ('{"method": "eagle", "num_speculative_tokens": 3}', "method must be one of"),
        ('{"model": "some/draft-model", "num_speculative_tokens": 3}', "only the ngram method"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be a positive"),
        ('{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "must not exceed"),
        ('{"method": "ngram", "draft_tensor_parallel_size": 1}', "unknown key"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "Expecting property name"),
    ],
)
def test_speculative_config_is_checked(tiny_model, text, error):
    with pytest.raises(ValueError, match=error):
        LLM(tiny_model, speculative_config=text)
    assert SpeculativeConfig.parse(NGRAM) == SpeculativeConfig("ngram", 4, 3, 1)
