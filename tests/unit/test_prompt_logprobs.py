"""prompt_logprobs (issue 21 item 6) from the engine equal HF transformers' log-probs of the prompt, with the
prompt in one step or split over chunked-prefill steps, and after a prefix-cache hit would have skipped the
positions (it must not). device "auto": on a GPU machine this is the CUDA path (Triton kernels, graphs)."""

from __future__ import annotations

import pytest

from kubellm.runtime import LLM, SamplingParams
from tests.support.hf_reference import hf_prompt_logprobs

PROMPTS = [
    [5, 17, 99, 3, 250, 41, 8, 77, 123, 9, 11, 300, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23, 24, 25, 26],
    [5, 17, 99, 3, 250, 41, 8],
    [7],
]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 8}], ids=["one-step", "chunked"])
def test_prompt_logprobs_match_hf(tiny_model, options):
    llm = LLM(tiny_model, block_size=16, **options)
    refs = [hf_prompt_logprobs(tiny_model, p) for p in PROMPTS]
    plain = SamplingParams(temperature=0, max_tokens=2)
    for _ in range(2):  # the second round finds the prompts' blocks in the prefix cache
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))
        for prompt, out, ref in zip(PROMPTS, outs, refs):
            lps = out.prompt_logprobs
            assert [lp.token_id for lp in lps] == prompt[1:]
            assert [lp.logprob for lp in lps] == pytest.approx(ref, abs=1e-4)
            for lp in lps:
                assert len(lp.top) == 3 and lp.rank >= 1
                assert (lp.rank == 1) == (lp.top[0][0] == lp.token_id)
        # the same tokens as a request that asks for nothing
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
        assert all(o.prompt_logprobs is None for o in llm.generate(PROMPTS, plain))
