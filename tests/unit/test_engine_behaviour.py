"""Engine behaviour a user sees: prefix caching, priorities, seeded sampling, stops, n > 1, logprobs, limits."""

from __future__ import annotations

import time

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.engine.engine import LLMEngine
from tests.support.hf_reference import hf_greedy
from tests.support.tiny_models import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_prefix_cache_hits_and_unchanged_output(tiny_model):
    llm = LLM(tiny_model, block_size=16)
    prompt = random_prompts(seed=3, lengths=[100])[0]
    first = llm.generate(prompt, GREEDY)[0]
    bm = llm.engine.block_manager
    hits_before = bm.prefix_cache_hits
    second = llm.generate(prompt, GREEDY)[0]
    assert bm.prefix_cache_hits - hits_before == 96  # 6 full blocks of the 100-token prompt
    assert second.num_cached_tokens == 96
    assert second.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(tiny_model, [prompt], 12)[0]


def test_prefix_cache_off_computes_everything(tiny_model):
    llm = LLM(tiny_model, enable_prefix_caching=False)
    prompt = random_prompts(seed=3, lengths=[100])[0]
    llm.generate(prompt, GREEDY)
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0


def test_priority_request_overtakes_and_preempted_ones_finish_unchanged(tiny_model):
    engine = LLMEngine.from_kwargs(
        tiny_model,
        scheduling_policy="priority",
        num_gpu_blocks=24,
        block_size=16,
        max_num_batched_tokens=256,
        enable_prefix_caching=False,
    )
    prompts = random_prompts(seed=5, lengths=[60, 60, 60, 60, 60, 100])
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    for i, p in enumerate(prompts[:5]):
        engine.add_request(f"low-{i}", p, params, priority=10)
    for _ in range(3):  # the low-priority batch fills the cache
        engine.step()
    assert engine.block_manager.num_free_blocks < 7  # the high-priority prompt needs 7 blocks
    engine.add_request("high", prompts[5], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), priority=0)
    order, results = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                results[out.request_id] = out.outputs[0].token_ids
    assert engine.scheduler.num_preemptions > 0
    assert order.index("high") < min(order.index(f"low-{i}") for i in range(5)), order
    assert [results[f"low-{i}"] for i in range(5)] == hf_greedy(tiny_model, prompts[:5], 80)
    assert results["high"] == hf_greedy(tiny_model, prompts[5:], 20)[0]


def test_seeded_sampling_is_independent_of_batch_mix(tiny_model):
    llm = LLM(tiny_model)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = random_prompts(seed=7, lengths=[30])[0]
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    others = random_prompts(seed=8, lengths=[5, 50, 120])
    mixed = llm.generate(others[:2] + [prompt] + others[2:], [noise, noise, seeded, noise])[2].outputs[0].token_ids
    assert mixed == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate(prompt, other_seed)[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy_and_min_p_one_is_greedy(tiny_model):
    llm = LLM(tiny_model)
    prompt = random_prompts(seed=9, lengths=[20])[0]
    greedy = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    for params in (
        SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12, ignore_eos=True),
    ):
        assert llm.generate(prompt, params)[0].outputs[0].token_ids == greedy


def test_repetition_penalty_matches_hf(tiny_model):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts(seed=11, lengths=[25])[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        repetition_penalty=1.3,
        eos_token_id=None,
        pad_token_id=3,
    )[0, 25:].tolist()
    params = SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True)
    assert LLM(tiny_model).generate(prompt, params)[0].outputs[0].token_ids == ref


def test_stop_strings_are_cut_and_not_returned(tiny_model):
    llm = LLM(tiny_model)
    prompt = "Once upon a time"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop = full.text[8:11]
    assert len(stop) == 3
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_eos(tiny_model):
    llm = LLM(tiny_model)
    prompt = random_prompts(seed=12, lengths=[10])[0]
    greedy = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[greedy[4]]))[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(greedy[4]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == greedy[4]


def test_logit_bias_bans_and_forces_tokens_per_request(tiny_model):
    llm = LLM(tiny_model)
    prompt = random_prompts(seed=15, lengths=[10])[0]
    greedy = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    ban = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={greedy[0]: -100.0})
    force = SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True, logit_bias={7: 100.0, 9: 100.0})
    banned, forced, plain = llm.generate([prompt] * 3, [ban, force, GREEDY])  # one batch: biases stay per row
    assert greedy[0] not in banned.outputs[0].token_ids
    assert set(forced.outputs[0].token_ids) <= {7, 9}
    assert plain.outputs[0].token_ids == greedy
    with pytest.raises(ValueError, match="logit_bias token ids"):
        llm.generate(prompt, SamplingParams(logit_bias={llm.engine.vocab_size: 1.0}))


def test_n_samples_share_the_prompt_blocks(tiny_model):
    llm = LLM(tiny_model, block_size=16)
    prompt = random_prompts(seed=13, lengths=[64])[0]
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different samples
    assert llm.engine.block_manager.prefix_cache_hits == 3 * 48  # siblings reuse 3 of the prompt's 4 blocks


def test_logprobs_are_log_softmax_of_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts(seed=14, lengths=[12])[0]
    out = LLM(tiny_model).generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1], dim=-1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(ref.argmax())
    assert lp.logprob == pytest.approx(float(ref.max()), abs=1e-4)
    assert [t for t, _ in lp.top] == ref.topk(5).indices.tolist()


def test_rejects_prompts_beyond_the_context_with_a_clear_error(tiny_model):
    llm = LLM(tiny_model, max_model_len=64)
    with pytest.raises(ValueError, match="context holds 64"):
        llm.generate([5] * 64, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**6]], GREEDY)
    out = llm.generate([5] * 60, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"  # capped by the context, not hung


def test_cache_smaller_than_the_context_caps_the_context(tiny_model):
    engine = LLMEngine.from_kwargs(tiny_model, num_gpu_blocks=4, block_size=16)
    assert engine.max_model_len == 64
    with pytest.raises(ValueError):
        engine.add_request("too-long", [5] * 64)


def test_queue_timeout_finishes_waiting_requests(tiny_model):
    engine = LLMEngine.from_kwargs(tiny_model, max_num_seqs=1, queue_timeout_s=0.05)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    engine.add_request("first", [5] * 10, params)
    engine.add_request("second", [6] * 10, params)
    engine.step()
    time.sleep(0.1)
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.outputs[0].finish_reason
    assert reasons == {"first": "length", "second": "timeout"}


def test_abort_frees_blocks(tiny_model):
    engine = LLMEngine.from_kwargs(tiny_model, max_num_batched_tokens=32)
    engine.add_request("a", [5] * 100, GREEDY)  # mid-prefill after one step
    engine.add_request("b", [6] * 10, GREEDY)
    engine.step()
    assert engine.abort_request("a").outputs[0].finish_reason == "abort"
    engine.step()
    engine.abort_request("b")  # mid-decode
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_unknown_engine_option_is_an_error(tiny_model):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(tiny_model, max_num_seq=4)


def test_async_scheduling_changes_no_output(tiny_model):
    """Launching the next decode step before the host has this one's tokens is invisible: greedy and seeded
    outputs, stop strings, stop tokens, n > 1, logprobs and aborts give what the synchronous engine gives,
    under forced preemption."""
    prompts = random_prompts(seed=11, lengths=[1, 7, 40, 90, 150, 210, 260, 33])
    common = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    greedy_ref = LLM(tiny_model, async_scheduling=False).generate(prompts, common)
    stop_token = greedy_ref[3].outputs[0].token_ids[10]  # a token that really occurs: some requests end on it
    params = [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=1, max_tokens=35, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, max_tokens=25, stop=["e", "a"], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token], ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=20, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=4, top_k=5, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, top_p=0.9, max_tokens=33, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=6, max_tokens=40),  # EOS may end it
    ]

    def run(async_scheduling: bool):
        engine = LLMEngine.from_kwargs(
            tiny_model, max_num_batched_tokens=64, num_gpu_blocks=30, async_scheduling=async_scheduling
        )
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", prompt, p)
        engine.add_request("gone", prompts[2], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        finished, steps = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = [
                        (
                            c.token_ids,
                            c.text,
                            c.finish_reason,
                            c.stop_reason,
                            [(lp.token_id, round(lp.logprob, 5)) for lp in c.logprobs or []],
                        )
                        for c in out.outputs
                    ]
            steps += 1
            if steps == 30:
                engine.abort_request("gone")
        engine.block_manager.check_invariants([])
        return finished, engine

    sync, sync_engine = run(False)
    ahead, engine = run(True)
    assert engine.num_steps_ahead > 10 and engine.scheduler.num_preemptions > 0
    assert ahead == sync
    # rows computed ahead for sequences that had ended are dropped, not counted
    assert engine.stats.generation_tokens == sync_engine.stats.generation_tokens
    assert sync["r3"][0][2] == "stop" and sync["r3"][0][3] == stop_token  # the stop token really ended one
    assert greedy_ref[0].outputs[0].token_ids[:30] == sync["r0"][0][0]


def test_a_new_request_is_scheduled_at_the_next_step_after_idle(tiny_model):
    """A step launched ahead for sequences that have all ended is dropped, not run in a new request's place."""
    engine = LLMEngine.from_kwargs(tiny_model)
    # ends on its first token, which nothing can foresee: the step launched ahead for it is left over
    engine.add_request("stops", [4, 5], SamplingParams(temperature=0, max_tokens=50, stop_token_ids=list(range(512))))
    engine.step()
    assert not engine.has_unfinished_requests() and engine.num_steps_ahead == 1
    engine.add_request("next", [6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 0


def test_grammars_constrain_the_output_and_end_it(tiny_model):
    """Structured output (llguidance): a random model's samples match a choice, a JSON schema and a regex,
    and end (finish "stop") once the grammar is complete, alongside an unguided request in the same batch;
    a greedy guided request through async scheduling (no step is launched ahead for it) too."""
    import json
    import re

    from kubellm.runtime import grammar_for

    llm = LLM(tiny_model)
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["answer", "count"],
        "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    }
    cases = [
        ("choice", ["red", "green", "blue"], lambda t: t in ("red", "green", "blue")),
        ("json", schema, lambda t: json.loads(t)["answer"] in ("yes", "no") and 0 <= json.loads(t)["count"] <= 99),
        ("regex", r"[a-c]{2,4}!", lambda t: re.fullmatch(r"[a-c]{2,4}!", t) is not None),
    ]
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)
    for kind, spec, valid in cases:
        guided = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=60, grammar=grammar_for(kind, spec))
        outs = llm.generate(["Hello", "Pick one", random_prompts(seed=9, lengths=[40])[0]], [guided, guided, free])
        for o in outs[:2]:
            for c in o.outputs:
                assert c.finish_reason == "stop" and valid(c.text), (kind, c.text, c.finish_reason)
        assert len(outs[2].outputs[0].token_ids) == 30  # the unguided neighbour is untouched
        greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=60, grammar=grammar_for(kind, spec)))
        assert valid(greedy[0].outputs[0].text), (kind, greedy[0].outputs[0].text)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    with pytest.raises(ValueError, match="invalid grammar"):
        llm.generate("Hello", SamplingParams(grammar=grammar_for("regex", "(unclosed")))


def test_offline_chat_renders_the_template_and_matches_hf(tiny_model):
    """LLM.chat (vLLM's): conversations through the tokenizer's chat template, greedy output == HF's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    second = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]
    llm = LLM(tiny_model)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.chat([first, second], params)
    ids = [
        tok.encode(
            tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        ),
        tok.encode(
            tok.apply_chat_template(second, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        ),
    ]
    assert [o.prompt_token_ids for o in outs] == ids
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(tiny_model, ids, 8)
    continued = llm.chat(second, params, add_generation_prompt=False, continue_final_message=True)[0]
    assert tok.decode(continued.prompt_token_ids).endswith("Once upon")
