"""Building blocks of the decoder: RMSNorm, rotary embedding, packed linear layers, SiLU-and-mul (each with a
fused Triton kernel for the CUDA path in triton_ops.py).

Each computes exactly what HF transformers computes (same dtype casts, same order) so that fp32 greedy
output matches token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.model import fp8
from kubellm.runtime.model.kernels import use_triton


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual: (norm(x + residual), x + residual), the sum HF's decoder layer adds
        before its next norm. The Triton kernel updates `residual` in place."""
        if use_triton():
            from kubellm.runtime.model.triton_ops import rms_norm

            out, residual = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE type (llama3, yarn, … via transformers)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")


class RotaryEmbedding(nn.Module):
    """cos/sin for every position up to max_positions, precomputed in fp32 as HF computes them per call."""

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        with torch.device("cpu"):  # also when the model is being built on the meta device
            inv_freq, scaling = rope_inv_freq(hf_config, head_dim)
            freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :].float()
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k: [tokens, heads, head_dim]
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + self._rotate_half(q) * sin, k * cos + self._rotate_half(k) * sin


class MergedLinear(nn.Module):
    """One matmul for several HF projections (q/k/v, gate/up); the loader fills each shard by index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__()
        self.out_sizes = out_sizes
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features))
        self.bias = nn.Parameter(torch.zeros(sum(out_sizes))) if bias else None

    def shard(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.out_sizes[:index])
        return tensor.narrow(0, start, self.out_sizes[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8.linear(x, self)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton():
        from kubellm.runtime.model import triton_ops

        return triton_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
