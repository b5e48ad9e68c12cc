"""FP8 (e4m3) weights: reading FP8 checkpoints and quantizing a model's weights to FP8 at load.

Checkpoint formats (config.json's quantization_config):
- compressed-tensors, format "float-quantized" (llm-compressor's FP8 models): `W.weight` in float8_e4m3fn with
  `W.weight_scale` per tensor ([] or [1]) or per output channel ([out, 1]); `W.input_scale` (static activation
  scales) is read and unused — activations stay in the model's dtype;
- HF fine-grained FP8 (quant_method "fp8", e.g. Qwen3-*-FP8): `W.weight` in float8_e4m3fn with
  `W.weight_scale_inv`, one scale per [block_out, block_in] block (weight_block_size).
Each is dequantized exactly (fp8 · scale, in fp32, then the model's dtype) as it is read, so the model equals
one whose weights are the dequantized FP8 ones. `quantization="fp8"` rounds a bf16/fp32 checkpoint's linear
weights to FP8 with one scale per output channel (amax / 448) the same way.

This is the reference path, on every device: the weights are held dequantized. FP8 matrix products on Hopper
(torch._scaled_mm with these scales) are the GPU's part, not here yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale")
# parameters `quantization="fp8"` rounds: the decoder's linear layers and experts (not embeddings, the LM head,
# norms or MoE routers, which FP8 checkpoints leave in high precision too)
QUANTIZED_LEAVES = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight", "w13", "w2")


@dataclass(frozen=True)
class Fp8Checkpoint:
    """How a checkpoint's FP8 weights are scaled: per tensor / channel (compressed-tensors) or per block."""

    method: str  # "compressed-tensors" | "fp8"
    block: tuple[int, int] | None = None  # (out, in) of one scale's block (fine-grained FP8)

    @classmethod
    def from_hf(cls, hf_config) -> Fp8Checkpoint | None:
        q = getattr(hf_config, "quantization_config", None)
        if q is None:
            return None
        q = q if isinstance(q, dict) else q.to_dict()
        method = q.get("quant_method")
        if method == "fp8":
            if q.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"FP8 checkpoint format {q.get('fmt')!r}: only e4m3 is supported")
            block = q.get("weight_block_size")
            return cls("fp8", tuple(block) if block else None)
        if method == "compressed-tensors":
            if q.get("format") != "float-quantized":
                raise ValueError(
                    f"compressed-tensors format {q.get('format')!r}: only float-quantized (FP8) is supported"
                )
            for group in q.get("config_groups", {}).values():
                w = group.get("weights") or {}
                if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("tensor", "channel"):
                    raise ValueError(f"compressed-tensors weights {w}: only FP8 per tensor or per channel is supported")
            return cls("compressed-tensors")
        raise ValueError(
            f"unsupported quantization_config quant_method {method!r} (supported: fp8, compressed-tensors)"
        )


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """fp8 weight [out, in] (or [..., out, in]) times its scale, in fp32: per tensor, per output channel
    ([out, 1]) or, with `block`, one scale per (block_out × block_in) tile."""
    w = weight.to(torch.float32)
    scale = scale.to(torch.float32)
    if block is not None:
        rows, cols = w.shape[-2:]
        scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
        scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    elif scale.dim() == 1 and scale.numel() > 1:  # per channel stored flat
        scale = scale[:, None]
    return w * scale


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale [..., out, 1]): each output channel scaled so its largest magnitude is 448."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def round_to_fp8(weight: torch.Tensor) -> torch.Tensor:
    """The weight as `quantization="fp8"` holds it: quantized per channel, dequantized to its dtype."""
    q, scale = quantize_per_channel(weight)
    return dequantize(q, scale).to(weight.dtype)


class DenseSlice:
    """A tensor with the two methods of a safetensors slice the loader uses (get_shape, indexing)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]
