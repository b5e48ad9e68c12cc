"""Tensor parallelism: the process group, the sharded layers, and the worker processes that mirror rank 0.

A model too big for one GPU is split across the GPUs of one pod, Megatron-style (as vLLM and nano-vllm do):
attention heads and MLP columns are divided among ranks, the two row-parallel projections (o_proj,
down_proj) sum their partial products with an all-reduce, and the embedding and LM head are split over the
vocabulary. Rank 0 runs the whole engine (scheduler, batch preparation, sampling); ranks 1 … n-1 are worker
processes that receive each step's host inputs (a StepPlan, see runner.py) over a pipe and run the same
forward on their shard, so every rank issues the same collectives in the same order. On the CPU the group
uses gloo, which is how the test suite checks sharding exactly against HF without GPUs.

A rank that dies while the group forms or loads its shard fails rank 0's start at once (rank 0 waits for
the others at two checkpoints, watching their processes, instead of in a collective that would wait out the
group's timeout); one that dies later fails rank 0's next step; one that hangs stalls the engine, which the
server's liveness check reports (engine_stall_timeout_s), so Kubernetes restarts the pod either way.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import pickle
import time
import traceback
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.process import exit_process, free_port

_RANK, _SIZE = 0, 1
_STORE: dist.TCPStore | None = None  # rank 0 serves it; the group's rendezvous and the start checkpoints
TIMEOUT = datetime.timedelta(minutes=10)


def size() -> int:
    return _SIZE


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
    ):
        if n % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's {what} ({n})")


# ---------------------------------------------------------------------------------------- sharded layers
def load_shard(dest: torch.Tensor, source, dim: int | None) -> None:
    """Copy this rank's part of a checkpoint tensor (`source`: a safetensors slice, read only where indexed):
    rows (or columns) rank·n … rank·n + n-1 of `dim`, n = dest's size there; the last vocabulary shard may be
    short (the rest of dest is padding). dim None: the whole tensor (replicated)."""
    shape = source.get_shape()
    if dim is None:
        dest.copy_(source[:])
        return
    n = dest.shape[dim]
    if -(-shape[dim] // _SIZE) != n:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(shape)} does not fit {tuple(dest.shape)} on each of {_SIZE} rank(s)"
        )
    start = _RANK * n
    length = max(min(n, shape[dim] - start), 0)
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + length)
    dest.narrow(dim, 0, length).copy_(source[tuple(index)])


# A module's `tp_dim`: the dimension of its weight that is split over ranks (the loader reads it).
class RowParallelLinear(nn.Linear):
    """y = x W^T over this rank's input columns, summed over ranks (o_proj, down_proj)."""

    tp_dim = 1

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features // _SIZE, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Rows rank·n … rank·n + n-1 of the embedding; each rank looks up its own ids, the others add zeros."""

    tp_dim = 0

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // _SIZE)
        self.start = _RANK * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _SIZE == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.rows)
        x = F.embedding((ids - self.start) * mine, self.weight)
        return all_reduce(x.masked_fill_(~mine[:, None], 0))


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered so every rank holds the whole row (the same bits)."""

    tp_dim = 0

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(-(-vocab_size // _SIZE), hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if _SIZE == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(_SIZE)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


# ---------------------------------------------------------------------------------------- worker processes
def _worker_main(config, info, max_model_len: int, tp_rank: int, port: int, conn) -> None:
    """A rank ≥ 1: build the same runner on its shard, then run every plan rank 0 sends until None."""
    from kubellm.runtime.model.runner import ModelRunner

    code = 0
    try:
        runner = ModelRunner(config, info, max_model_len, tp_rank=tp_rank, port=port)
        gc.collect()  # a full collection walking the startup heap would stall every rank's collectives
        gc.freeze()
        while (plan := pickle.loads(conn.recv_bytes())) is not None:
            runner.run_plan_as_worker(plan)
    except (EOFError, OSError):  # rank 0 is gone
        pass
    except BaseException:
        traceback.print_exc()
        code = 1
    destroy_group()
    exit_process(code)


class Workers:
    """Ranks 1 … n-1 of this engine, as child processes; stopped when rank 0's runner closes or is dropped.
    (A daemonic process may not start children: the server's engine process is not daemonic.)"""

    def __init__(self, config, info, max_model_len: int):
        self.port = free_port()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        self.conns, self.procs = [], []
        for r in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(config, info, max_model_len, r, self.port, child),
                name=f"kubellm-tp-{r}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._finalizer = weakref.finalize(self, Workers._stop, self.conns, self.procs)

    def check(self) -> None:
        """Raise if a worker has exited: the engine fails (the server reports it) instead of waiting on it."""
        for r, proc in enumerate(self.procs, 1):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel rank {r} exited with code {proc.exitcode}")

    def send(self, plan) -> None:
        self.check()
        data = pickle.dumps(plan, pickle.HIGHEST_PROTOCOL)  # once for every rank
        for conn in self.conns:
            conn.send_bytes(data)

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _stop(conns, procs) -> None:
        for conn in conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except (OSError, BrokenPipeError):
                pass
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        destroy_group()  # rank 0's side: another engine in this process may start a group of its own
