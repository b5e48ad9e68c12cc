"""Which implementation the model's hot operations run: the exact torch code, or the fused Triton kernels
(paged decode and prefill attention, RMSNorm with the residual add, q/k norm + rotary + KV-cache write,
SiLU-and-mul, sampling). One choice per process, made by the model runner from EngineConfig.kernels:

- "auto": Triton on CUDA GPUs from Ampere on (compute capability 8.0: bf16 matrix products, the GPUs the
  kernels were written for) with triton installed and a power-of-two head_dim; torch elsewhere, with a
  warning on a GPU saying why;
- "torch": torch everywhere (on CUDA: the unfused path, no CUDA graphs);
- "triton": Triton everywhere — on the CPU only through Triton's interpreter (TRITON_INTERPRET=1), which
  is how the CPU test suite runs the whole CUDA path of the model.

to_device is how the hot path's host inputs reach the device: queued on the stream, never a sync.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import torch

from kubellm.settings import KERNEL_CHOICES

log = logging.getLogger("kubellm.kernels")
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
    if choice != "auto" or device.type != "cuda":
        _use_triton = choice == "triton"
        return _use_triton
    reasons = []
    if torch.cuda.get_device_capability(device) < (8, 0):
        reasons.append("the GPU is older than Ampere")
    if not pow2:
        reasons.append(f"head_dim {head_dim} is not a power of two")
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    if reasons:
        log.warning("torch kernels on this GPU (no Triton, no CUDA graphs): %s", "; ".join(reasons))
    _use_triton = not reasons
    return _use_triton


def use_triton() -> bool:
    return _use_triton


def to_device(
    values: list | np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """Host values on the device without waiting for the device: through pinned memory, queued on the
    stream. (A plain copy waits for everything queued before it, which would stall a step launched ahead.)"""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
