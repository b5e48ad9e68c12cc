"""Tensor-parallel ranks 1 … n-1 as worker processes: each builds the same ModelRunner on its shard and runs every
step plan rank 0 sends (a StepPlan, see runner.py) over a pipe, so every rank issues the same collectives in the
same order. Rank 0 runs the whole engine (scheduler, batch preparation, sampling)."""

from __future__ import annotations

import gc
import multiprocessing
import pickle
import traceback
import weakref

from kubellm.runtime.model import parallel
from kubellm.runtime.process import exit_process, free_port


def _worker_main(runner_cls, config, info, max_model_len: int, tp_rank: int, port: int, conn) -> None:
    """A rank ≥ 1: build the same runner on its shard, then run every plan rank 0 sends until None."""
    code = 0
    try:
        runner = runner_cls(config, info, max_model_len, tp_rank=tp_rank, port=port)
        gc.collect()  # a full collection walking the startup heap would stall every rank's collectives
        gc.freeze()
        while (plan := pickle.loads(conn.recv_bytes())) is not None:
            runner.run_plan_as_worker(plan)
    except (EOFError, OSError):  # rank 0 is gone
        pass
    except BaseException:
        traceback.print_exc()
        code = 1
    parallel.destroy_group()
    exit_process(code)


class Workers:
    """Ranks 1 … n-1 of this engine, as child processes; stopped when rank 0's runner closes or is dropped.
    (A daemonic process may not start children: the server's engine process is not daemonic.)"""

    def __init__(self, runner_cls, config, info, max_model_len: int):
        self.port = free_port()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        self.conns, self.procs = [], []
        for r in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(runner_cls, config, info, max_model_len, r, self.port, child),
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
        parallel.destroy_group()  # rank 0's side: another engine in this process may start a group of its own
