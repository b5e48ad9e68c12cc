"""The tensor-parallel process group of one model's ranks: joining it, start-up checkpoints, collectives.

A model too big for one GPU is split across the GPUs of one pod, Megatron-style (as vLLM and nano-vllm do):
sharded.py holds the split layers; engine/tp_workers.py runs ranks 1 … n-1 as processes that mirror rank 0.
On the CPU the group uses gloo, which is how the test suite checks sharding exactly against HF without GPUs.

A rank that dies while the group forms or loads its shard fails rank 0's start at once (rank 0 waits for
the others at two checkpoints, watching their processes, instead of in a collective that would wait out the
group's timeout); one that dies later fails rank 0's next step; one that hangs stalls the engine, which the
server's liveness check reports (engine_stall_timeout_s), so Kubernetes restarts the pod either way.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

_RANK, _SIZE = 0, 1
_STORE: dist.TCPStore | None = None  # rank 0 serves it; the group's rendezvous and the start checkpoints
TIMEOUT = datetime.timedelta(minutes=10)


def size() -> int:
    return _SIZE


def rank() -> int:
    return _RANK


def init_group(
    tp_rank: int, tp_size: int, port: int, device: torch.device, check_workers: Callable[[], None] | None = None
) -> None:
    """Join the group. check_workers (rank 0) raises if a worker process has exited."""
    global _RANK, _SIZE, _STORE
    _RANK, _SIZE = tp_rank, tp_size
    if tp_size == 1:
        return
    _STORE = dist.TCPStore("127.0.0.1", port, tp_size, is_master=tp_rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    checkpoint("joined", check_workers)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=_STORE,
        rank=tp_rank,
        world_size=tp_size,
        timeout=TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def checkpoint(name: str, check_workers: Callable[[], None] | None = None) -> None:
    """Ranks ≥ 1 report that they got here; rank 0 waits until all have, calling check_workers meanwhile, so a
    worker that died (a bad GPU, out of memory while loading) fails the start now rather than leave rank 0 in
    a rendezvous or collective until the group's timeout."""
    if _SIZE == 1:
        return
    if _RANK > 0:
        _STORE.set(f"{name}/{_RANK}", "")
        return
    keys = [f"{name}/{r}" for r in range(1, _SIZE)]
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while not _STORE.check(keys):
        if check_workers is not None:
            check_workers()
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel ranks did not reach '{name}' within {TIMEOUT}")
        time.sleep(0.05)


def destroy_group() -> None:
    global _RANK, _SIZE, _STORE
    if _SIZE > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _RANK, _SIZE, _STORE = 0, 1, None


def all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if _SIZE > 1:
        dist.all_reduce(x, op=op)
    return x


def check_divisible(shape, tp_size: int) -> None:
    """Refuse, before any process starts, a split that does not divide the model evenly."""
    for what, n in (
        ("attention heads", shape.num_heads),
        ("key/value heads", shape.num_kv_heads),
        ("MLP columns (intermediate_size)", shape.intermediate_size),
        ("expert MLP columns (moe_intermediate_size)", getattr(shape, "moe_intermediate_size", 0)),
    ):
        if n % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's {what} ({n})")
