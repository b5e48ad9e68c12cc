"""FP8 weights on the CPU's reference path: an FP8 checkpoint (compressed-tensors per tensor / per channel, HF
fine-grained per block; a dense and a MoE model) generates exactly what HF transformers generates with the
dequantized weights, and `quantization="fp8"` exactly what a checkpoint of its rounded weights generates."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.model import fp8
from tests.support.fp8_checkpoints import write_fp8_checkpoint
from tests.support.hf_reference import hf_greedy
from tests.support.tiny_models import NEW_TOKENS, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_checkpoint_equals_its_dequantized_model(tiny_models, tmp_path, arch, scheme):
    quantized, reference = str(tmp_path / "fp8"), str(tmp_path / "reference")
    write_fp8_checkpoint(tiny_models[arch], quantized, reference, scheme)
    prompts = random_prompts(lengths=[1, 17, 64, 150])
    llm = LLM(quantized, dtype="float32", max_num_batched_tokens=64)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(reference, prompts, NEW_TOKENS)
    # and the FP8 weights are not the original ones (the rounding is visible)
    ours = llm.engine.runner.model.state_dict()["model.layers.0.self_attn.o_proj.weight"]
    from safetensors.torch import load_file

    original = load_file(os.path.join(tiny_models[arch], "model.safetensors"))["model.layers.0.self_attn.o_proj.weight"]
    assert not torch.equal(ours, original.float())


def test_dynamic_fp8_equals_a_checkpoint_of_its_rounded_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_models["qwen3_moe"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    rounded = {}
    for name, w in tensors.items():  # what --quantization fp8 holds: per output channel, amax / 448
        module = name.rsplit(".", 2)[-2]
        quantize = module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        rounded[name] = fp8.round_to_fp8(w) if quantize else w
    reference = tmp_path / "rounded"
    shutil.copytree(src, reference)
    save_file(rounded, str(reference / "model.safetensors"), metadata={"format": "pt"})
    prompts = random_prompts(lengths=[3, 40, 120])
    got = LLM(src, quantization="fp8").generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(str(reference), prompts, NEW_TOKENS)
    assert any(not torch.equal(rounded[n], tensors[n]) for n in tensors)


def test_fp8_refusals(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(tiny_model, quantization="int4")
    quantized, reference = str(tmp_path / "fp8"), str(tmp_path / "reference")
    write_fp8_checkpoint(tiny_model, quantized, reference, "channel")
    with open(os.path.join(quantized, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    with open(os.path.join(quantized, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="only FP8 per tensor or per channel"):
        LLM(quantized)
