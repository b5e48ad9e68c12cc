"""FP8 (e4m3) weights: reading FP8 checkpoints, quantizing a model's weights to FP8 at load, and FP8 matmuls.

Checkpoint formats (config.json's quantization_config):
- compressed-tensors, format "float-quantized" (llm-compressor's FP8 models): `W.weight` in float8_e4m3fn with
  `W.weight_scale` per tensor ([] or [1]) or per output channel ([out, 1]); `W.input_scale` (static activation
  scales) is read and unused — activations are scaled per token, dynamically;
- HF fine-grained FP8 (quant_method "fp8", e.g. Qwen3-*-FP8): `W.weight` in float8_e4m3fn with
  `W.weight_scale_inv`, one scale per [block_out, block_in] block (weight_block_size).
`quantization="fp8"` quantizes a bf16/fp32 checkpoint's linear weights with one scale per output channel
(amax / 448).

Two ways to run them:
- FP8 matmuls, where the device has them (compute capability ≥ 8.9: Ada, Hopper) and the model runs in bf16
  (`matmuls_supported`): the decoder's dense projections hold FP8 values with one fp32 scale per output channel
  (half the bytes of bf16), and each matmul quantizes its input per token (row amax / 448) and runs W8A8 through
  torch._scaled_mm (`scaled_linear`), as vLLM's dynamic FP8 does. Per-tensor and per-channel checkpoints keep
  their exact values (a tensor's scale becomes every row's); block-scaled ones and MoE experts (the fused MoE
  kernel reads bf16) are held dequantized — block weights as the reference path holds them, then rounded again
  per channel for the dense projections.
- The reference path, everywhere else: weights dequantized exactly (fp8 · scale, in fp32, then the model's dtype)
  as they are read, so the model equals one whose weights are the dequantized FP8 ones (tested against HF).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale")
# parameters `quantization="fp8"` rounds: the decoder's linear layers and experts (not embeddings, the LM head,
# norms or MoE routers, which FP8 checkpoints leave in high precision too)
QUANTIZED_LEAVES = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight", "w13", "w2")
MATMUL_LEAVES = QUANTIZED_LEAVES[:4]  # the dense projections, which run as FP8 matmuls where the device can


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


class Fp8Weight:
    """An FP8 checkpoint weight as read: a safetensors-slice look-alike of its dequantized values (what the
    reference path loads), and `per_row()`, the FP8 values with one scale per output row (what FP8 matmuls load)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype):
        self.weight, self.scale, self.block, self.dtype = weight, scale.to(torch.float32), block, dtype

    @cached_property
    def dense(self) -> torch.Tensor:
        return dequantize(self.weight, self.scale, self.block).to(self.dtype)

    def get_shape(self) -> list[int]:
        return list(self.weight.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.dense[index]

    def per_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 values [out, in], fp32 scales [out, 1]); exact for per-tensor and per-channel scales."""
        if self.block is not None:
            return quantize_per_channel(self.dense)
        rows = self.weight.shape[0]
        return self.weight, self.scale.reshape(-1, 1).expand(rows, 1).contiguous()


def matmuls_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """FP8 matmuls with per-row and per-column scales (torch._scaled_mm, bf16 out): GPUs of compute capability
    8.9 and up (Ada, Hopper), for a model that runs in bf16."""
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 9)


def hold_projections_in_fp8(model: nn.Module, quantize: bool) -> None:
    """Make the decoder's dense projections FP8 (values [out, in] and a `weight_scale` buffer [1, out]) so their
    matmuls run as `scaled_linear`. quantize: round the weights they hold now (per output channel); else leave
    them zero for the loader to fill."""
    for name, param in list(model.named_parameters()):
        if not name.endswith(MATMUL_LEAVES):
            continue
        module = model.get_submodule(name.rpartition(".")[0])
        if quantize:
            q, scale = quantize_per_channel(param.data)
        else:
            q = torch.zeros(param.shape, dtype=FP8, device=param.device)
            scale = torch.ones(param.shape[0], 1, device=param.device)
        del module.weight  # the bf16 tensor goes now, not after the whole model is converted
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale", scale.reshape(1, -1).contiguous(), persistent=False)


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
    """x W^T (+ bias) as a W8A8 matmul: x quantized per token (row amax / 448), W per output channel; out in
    x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = (rows.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A projection's x W^T (+ b): an FP8 matmul when it holds FP8 weights (hold_projections_in_fp8)."""
    bias = getattr(module, "bias", None)
    if module.weight.dtype == FP8:
        return scaled_linear(x, module.weight, module.weight_scale, bias)
    return F.linear(x, module.weight, bias)
