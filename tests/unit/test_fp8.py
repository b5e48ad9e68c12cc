"""FP8 weights. The reference path (CPU, GPUs without FP8 matmuls): an FP8 checkpoint (compressed-tensors per
tensor / per channel, HF fine-grained per block; a dense and a MoE model) generates exactly what HF transformers
generates with the dequantized weights, and `quantization="fp8"` exactly what a checkpoint of its rounded weights
generates. The FP8-matmul path (Ada/Hopper GPUs), run here through torch._scaled_mm on the CPU by declaring the
CPU capable: the W8A8 product is what its definition computes, the projections hold the checkpoint's own FP8
values and scales, and the model stays close to the reference path (a bound that a wrong scale breaks)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.model import fp8
from tests.support.fp8_checkpoints import FP8, write_fp8_checkpoint
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


@pytest.fixture
def fp8_matmuls(monkeypatch):
    """The CPU declared capable of FP8 matmuls (torch._scaled_mm runs there too), for bf16 models as on a GPU."""
    monkeypatch.setattr(fp8, "matmuls_supported", lambda device, dtype: dtype == torch.bfloat16)


def test_scaled_linear_is_the_w8a8_product():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 64, generator=g) * torch.linspace(0.1, 4, 7)[:, None]).to(torch.bfloat16)
    w, bias = torch.randn(48, 64, generator=g) * 0.05, torch.randn(48, generator=g).to(torch.bfloat16)
    q, w_scale = fp8.quantize_per_channel(w)
    got = fp8.scaled_linear(x, q, w_scale.reshape(1, -1), bias)
    # the definition: x quantized per row with amax / 448, both dequantized, the product in fp32
    x_scale = x.float().abs().amax(dim=1, keepdim=True) / 448
    expected = ((x.float() / x_scale).to(FP8).float() * x_scale) @ (q.float() * w_scale).T + bias.float()
    assert got.dtype == torch.bfloat16 and got.shape == (7, 48)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
    assert (got.float() - x.float() @ w.T).abs().max() > 1e-3  # the quantization shows


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_matmuls_hold_the_checkpoints_values(tiny_model, tmp_path, fp8_matmuls, scheme):
    from safetensors.torch import load_file

    quantized, reference = str(tmp_path / "fp8"), str(tmp_path / "reference")
    write_fp8_checkpoint(tiny_model, quantized, reference, scheme)
    model = LLM(quantized, dtype="bfloat16").engine.runner.model
    attention = model.model.layers[0].self_attn
    held, scale = attention.qkv_proj.weight, attention.qkv_proj.weight_scale.reshape(-1, 1)
    assert held.dtype == FP8 and attention.o_proj.weight.dtype == FP8
    checkpoint = load_file(os.path.join(quantized, "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"  # the middle shard of the packed q/k/v
    rows = slice(attention.q_size, attention.q_size + attention.kv_size)
    if scheme == "block":  # dequantized, then quantized again per row: close to the checkpoint, not its bits
        dequantized = load_file(os.path.join(reference, "model.safetensors"))[name]
        torch.testing.assert_close(held[rows].float() * scale[rows], dequantized, rtol=0.07, atol=1e-3)
        return
    assert torch.equal(held[rows].view(torch.uint8), checkpoint[name].view(torch.uint8))
    stored = checkpoint[name.replace("weight", "weight_scale")].float()
    assert torch.equal(scale[rows], stored.reshape(-1, 1).expand(attention.kv_size, 1))


def test_fp8_matmuls_stay_close_to_the_reference_path(tiny_models, monkeypatch):
    """Prompt logprobs (teacher-forced) of `quantization="fp8"` with FP8 matmuls against the same weights
    dequantized (W8A16): what quantizing the activations per token costs, bounded; a weight scale off by a
    factor of two here and there is far outside the bound."""
    prompts = random_prompts(lengths=[40, 80, 120])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs() -> list[float]:
        outputs = LLM(tiny_models["qwen3"], dtype="bfloat16", quantization="fp8").generate(prompts, params)
        return [t.logprob for o in outputs for t in o.prompt_logprobs]

    monkeypatch.setattr(fp8, "matmuls_supported", lambda device, dtype: False)  # also on a GPU that has them
    reference = prompt_logprobs()
    monkeypatch.setattr(fp8, "matmuls_supported", lambda device, dtype: dtype == torch.bfloat16)
    w8a8 = prompt_logprobs()
    drift = sum(abs(a - b) for a, b in zip(reference, w8a8, strict=True)) / len(reference)
    assert 0 < drift < 0.5, drift  # measured 0.15 nats; the spread of these logprobs is ~1.4 nats

    exact = fp8.scaled_linear
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(
        fp8, "scaled_linear", lambda x, w, s, b: exact(x, w, s * 2.0 ** torch.randint(-1, 2, s.shape, generator=g), b)
    )
    wrong = prompt_logprobs()
    assert sum(abs(a - b) for a, b in zip(reference, wrong, strict=True)) / len(reference) > 0.5
