"""Which implementation the model's hot operations run: the exact torch code, or the fused Triton kernels
(paged decode and prefill attention, RMSNorm with the residual add, q/k norm + rotary + KV-cache write,
SiLU-and-mul). One choice per process, made by the model runner from EngineConfig.kernels:

- "auto": Triton on CUDA, torch on the CPU;
- "torch": torch everywhere (on CUDA: the unfused path, no CUDA graphs);
- "triton": Triton everywhere — on the CPU only through Triton's interpreter (TRITON_INTERPRET=1), which
  is how the CPU test suite runs the whole CUDA path of the model.
"""

from __future__ import annotations

import os

import torch

from kubellm.runtime.config import KERNEL_CHOICES

_use_triton = False


def select(choice: str, device: torch.device, head_dim: int) -> bool:
    """Set (and return) whether the Triton kernels run in this process."""
    global _use_triton
    assert choice in KERNEL_CHOICES, choice  # EngineConfig validated it
    pow2 = head_dim & (head_dim - 1) == 0  # tl.arange spans a power of two
    if choice == "triton":
        if not pow2:
            raise ValueError(f"the Triton kernels need a power-of-two head_dim, got {head_dim}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels='triton' on the CPU runs through Triton's interpreter: set TRITON_INTERPRET=1")
    _use_triton = choice == "triton" or (choice == "auto" and device.type == "cuda" and pow2)
    return _use_triton


def use_triton() -> bool:
    return _use_triton
