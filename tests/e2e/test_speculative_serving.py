"""`kubellm serve --speculative-config` (vLLM's flag, method ngram) through the official openai client: the
completion is the one HF's greedy decoding gives, streamed or not; a streamed chat at temperature 0.8
speculates (rejection sampling) and, seeded, is the answer the engine gives without speculation; /metrics
counts the drafts and accepted tokens with vLLM's spec_decode counters."""

from __future__ import annotations

import random

import openai
import pytest

from kubellm.runtime import LLM, SamplingParams
from tests.support.hf_reference import hf_greedy
from tests.support.server import ServerProcess
from tests.support.tiny_models import bigram_model, looping_model

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'


def serve_speculating(model: str, name: str):
    s = ServerProcess(model, "--speculative-config", NGRAM, "--served-model-name", name)
    try:
        yield s.wait_ready(), model
    finally:
        s.stop()


@pytest.fixture(scope="module")
def spec_server(tiny_model, tmp_path_factory):
    yield from serve_speculating(looping_model(tiny_model, str(tmp_path_factory.mktemp("looping"))), "looping")


def test_speculative_completion_is_greedy_and_counted(spec_server):
    server, model = spec_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    rng = random.Random(3)
    prompt = [rng.randrange(4, 500) for _ in range(12)] * 3  # its output cycles within 64 tokens
    expected = hf_greedy(model, [prompt], 64)[0]
    kwargs = dict(model="looping", prompt=prompt, max_tokens=64, temperature=0)
    whole = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert whole.choices[0].token_ids == expected
    stream = client.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in stream)
    assert streamed == whole.choices[0].text
    drafts = server.metric("vllm:spec_decode_num_drafts_total")
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and accepted > 0
    assert server.metric("kubellm_spec_decode_num_draft_tokens_total") >= accepted


SUPPORT = [40, 41, 42, 43]


@pytest.fixture(scope="module")
def sampled_server(tiny_model, tmp_path_factory):
    """A model whose sampled output revisits four tokens (n-gram drafts, right about half the time)."""
    logits = [[0.0, 1.5, -0.5, 0.8], [1.0, 0.0, 1.2, -1.0], [-0.5, 0.5, 0.0, 1.5], [1.2, -0.3, 0.4, 0.0], [0, 0, 0, 0]]
    yield from serve_speculating(
        bigram_model(tiny_model, str(tmp_path_factory.mktemp("bigram")), SUPPORT, logits), "bigram"
    )


def test_sampled_streaming_chat_speculates(sampled_server):
    server, model = sampled_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Hello world"}]
    drafts = server.metric("vllm:spec_decode_num_drafts_total")
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total")
    stream = client.chat.completions.create(
        model="bigram",
        messages=messages,
        temperature=0.8,
        seed=5,
        max_tokens=64,
        stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    tokens, finish = [], None
    for chunk in stream:
        if chunk.choices:
            tokens += getattr(chunk.choices[0], "token_ids", None) or []  # absent from the role chunk
            finish = chunk.choices[0].finish_reason or finish
    assert len(tokens) == 64 and set(tokens) <= set(SUPPORT) and finish == "length"
    assert server.metric("vllm:spec_decode_num_drafts_total") > drafts
    assert server.metric("vllm:spec_decode_num_accepted_tokens_total") > accepted
    # the tokens the engine samples with this seed without speculation
    plain = SamplingParams(temperature=0.8, seed=5, max_tokens=64, ignore_eos=True)
    assert tokens == LLM(model).chat(messages, plain)[0].outputs[0].token_ids
