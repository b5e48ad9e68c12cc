"""`kubellm serve --speculative-config` (vLLM's flag, method ngram) through the official openai client: the
completion is the one HF's greedy decoding gives, streamed or not, and /metrics counts the drafts and accepted
tokens with vLLM's spec_decode counters."""

from __future__ import annotations

import random

import openai
import pytest

from tests.support.hf_reference import hf_greedy
from tests.support.server import ServerProcess
from tests.support.tiny_models import looping_model

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'


@pytest.fixture(scope="module")
def spec_server(tiny_model, tmp_path_factory):
    model = looping_model(tiny_model, str(tmp_path_factory.mktemp("looping")))
    s = ServerProcess(model, "--speculative-config", NGRAM, "--served-model-name", "looping")
    try:
        yield s.wait_ready(), model
    finally:
        s.stop()


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
