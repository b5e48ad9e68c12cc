"""EngineConfig: every knob of the engine, as a plain dataclass (no pydantic on the GPU machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

SCHEDULING_POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")
KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # "auto" = the checkpoint's torch_dtype; or float32 / bfloat16 / float16
    device: str = "auto"  # "auto" = cuda when present, else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30  # KV budget when the device is the CPU
    swap_space_bytes: int = 1 << 30  # CPU pool for preemption by swapping
    num_gpu_blocks: int | None = None  # override the computed KV budget (tests force preemption with it)
    num_cpu_blocks: int | None = None  # override the swap pool size
    queue_timeout_s: float | None = None  # a request waiting longer finishes with reason "timeout"
    enforce_eager: bool = False  # CUDA only: no CUDA graphs
    async_scheduling: bool = True  # launch the next decode step before the host has this one's tokens
    tensor_parallel_size: int = 1  # GPUs one model is split across (CPU: processes, for tests); parallel.py
    kernels: str = "auto"  # "auto" (Triton on Ampere+ GPUs, else torch) | "torch" | "triton": model/kernels.py
    seed: int = 0
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ValueError(f"model directory not found: {self.model}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        """Build from keyword arguments, refusing unknown names (a typo must not be ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)
