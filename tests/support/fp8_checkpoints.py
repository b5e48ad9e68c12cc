"""FP8 checkpoints written by hand from a tiny model, following the formats' specifications: compressed-tensors
("float-quantized", weight_scale per tensor or per output channel, as llm-compressor writes them) and HF's
fine-grained FP8 (quant_method "fp8", weight_scale_inv per block). Each comes with its reference: the same model
in fp32 whose weights are the dequantized FP8 ones (what HF transformers runs)."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

# the projections FP8 checkpoints quantize (embeddings, LM head, norms and routers stay in high precision)
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
FP8 = torch.float8_e4m3fn


def _quantize(w: torch.Tensor, scheme: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale as the format stores it)."""
    w = w.float()
    if scheme == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        return (w / scale).to(FP8), scale
    if scheme == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        return (w / scale).to(FP8), scale
    rows, cols = w.shape
    br, bc = block
    scale = torch.empty(-(-rows // br), -(-cols // bc))
    q = torch.empty_like(w, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            scale[i, j] = tile.abs().max() / 448
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (tile / scale[i, j]).to(FP8)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str, block: tuple[int, int]) -> torch.Tensor:
    if scheme != "block":
        return q.float() * scale
    full = scale.repeat_interleave(block[0], 0)[: q.shape[0]].repeat_interleave(block[1], 1)[:, : q.shape[1]]
    return q.float() * full


def quantization_config(scheme: str, block: tuple[int, int]) -> dict:
    if scheme == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": scheme, "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            }
        },
    }


def write_fp8_checkpoint(src: str, dst: str, reference: str, scheme: str, block: tuple[int, int] = (32, 48)) -> None:
    """dst: src with its projections in FP8 (scheme "tensor" | "channel": compressed-tensors; "block": HF
    fine-grained FP8); reference: src in fp32 with those projections dequantized."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in QUANTIZED:
            quantized[name] = w
            dequantized[name] = w.float()
            continue
        q, scale = _quantize(w, scheme, block)
        quantized[name] = q
        quantized[name + ("_scale_inv" if scheme == "block" else "_scale")] = scale
        if scheme != "block":
            quantized[name.removesuffix("weight") + "input_scale"] = torch.ones(1)  # read, unused
        dequantized[name] = _dequantize(q, scale, scheme, block)
    for out, weights in ((dst, quantized), (reference, dequantized)):
        shutil.copytree(src, out, dirs_exist_ok=True)
        save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config(scheme, block)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
