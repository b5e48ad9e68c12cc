"""ModelRunner: owns the device, the model, the KV cache and its CPU swap pool; turns a scheduled batch
into a StepPlan (the step's inputs and attention metadata, on the host), runs it — on every tensor-parallel
rank — and samples.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kubellm import fit
from kubellm.downloads import LOADING_WEIGHTS, WARMING_UP, startup_line
from kubellm.runtime.engine.sampler import PromptLogprobs, SampledTokens, Sampler
from kubellm.runtime.engine.scheduler import SchedulerOutput
from kubellm.runtime.engine.sequence import Sequence
from kubellm.runtime.engine.speculation import accept, draft_rows
from kubellm.runtime.engine.tp_workers import Workers
from kubellm.runtime.engine.wire import TokenLogprob
from kubellm.runtime.model import fp8, kernels, lora, parallel
from kubellm.runtime.model.attention import AttentionMetadata, is_fp8, kv_cache_dtype, set_context
from kubellm.runtime.model.kernels import to_device
from kubellm.runtime.model.loader import ModelInfo, load_model
from kubellm.settings import EngineConfig

log = logging.getLogger("kubellm.runner")


@dataclass
class StepPlan:
    """One step's forward as host data, made by rank 0's host prep; with tensor parallelism, pickled to every
    other rank, which runs the same forward on its shard (engine/tp_workers.py). Lists and numpy arrays, no tensors:
    they pickle in microseconds (a tensor pickles through torch.save)."""

    num_rows: int  # input tokens (eager) or real rows (graph replay); 0: only swap blocks
    input_ids: list[int] | None = None  # None: on the device, the previous step's sampled tokens
    positions: list[int] | np.ndarray | None = None
    slots: list[int] | np.ndarray | None = None
    context_lens: list[int] | None = None
    tables: np.ndarray | None = None  # [sequences, blocks]
    query_lens: list[int] | None = None
    num_decodes: int = 0
    sample_rows: list[int] | None = None  # rows whose hidden state is sampled; None: all
    graph_size: int | None = None  # replay the decode graph captured at this batch size
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    lora_rows: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot): model/lora.py


@dataclass
class DraftCheck:
    """The tokens sampled at the draft positions of a speculating step (engine/speculation.py), on their way
    to the host: row i of a sequence's draft_len rows is its sample after the last token and draft[:i]."""

    seqs: list[Sequence]  # those with a draft, in row order
    samples: SampledTokens


@dataclass
class LaunchedStep:
    """A step queued on the device: one sampled token per sequence in `sampling` (a speculating sequence's is
    the token after its whole draft; `collect` settles what its draft yields)."""

    sampling: list[Sequence]
    sampled: SampledTokens | None
    prompt: PromptLogprobs | None = None  # prompt logprobs computed by this step, if any asked for them
    drafts: DraftCheck | None = None
    accepted: dict[int, list[int]] | None = None  # collect: seq_id → the draft tokens accepted


class HostBlockTables:
    """The block tables of the current batch, row by row, in a host buffer kept across steps.

    Block tables only grow (the block manager assigns a new list when it resets one), so a sequence found
    in the same row as last step only has its new blocks written: a few writes per step instead of
    rebuilding a [batch, blocks] table (milliseconds at 256 sequences). Entries past a row's length are
    stale but never read: every read is bounded by the sequence's context length. fill() returns a fresh
    contiguous copy, so the buffer may change while a device copy from the last step is still queued.
    """

    def __init__(self, rows: int, cols: int):
        self.array = np.zeros((rows, cols), dtype=np.int64)
        self.owner: list[list[int] | None] = [None] * rows  # the block_table list each row mirrors
        self.written = [0] * rows

    def fill(self, seqs: list[Sequence]) -> np.ndarray:
        """Rows 0 … len(seqs)-1 hold these sequences' tables; returns that [len(seqs), widest] view."""
        width = 1
        for row, seq in enumerate(seqs):
            table, n = seq.block_table, len(seq.block_table)
            if self.owner[row] is table:
                done = self.written[row]
                if n > done:
                    self.array[row, done:n] = table[done:]
            else:
                self.array[row, :n] = table
                self.owner[row] = table
            self.written[row] = n
            width = max(width, n)
        return self.array[: len(seqs), :width].copy()


class _EagerReplay:
    """A decode "graph" where CUDA graphs do not exist: replay() runs the forward on the static buffers."""

    def __init__(self, runner: ModelRunner, meta: AttentionMetadata, hidden: torch.Tensor):
        self.runner, self.meta, self.hidden = runner, meta, hidden

    def replay(self) -> None:
        n, r = self.meta.num_decodes, self.runner
        self.hidden.copy_(r._forward(r.g_input[:n], r.g_positions[:n], self.meta))


def check_fit(config: EngineConfig, max_model_len: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse (fit.DoesNotFit) a model that cannot fit before loading it: kubellm/fit.py's estimate against
    --device-memory-bytes, else the GPU's memory; on the CPU without that flag there is nothing to check."""
    memory = config.device_memory_bytes
    if memory is None and device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    if memory is None:
        return
    estimate = fit.estimate(
        fit.read_config(config.model),
        memory,
        dtype=config.dtype,
        tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        quantization=config.quantization,
        kv_cache_dtype=config.kv_cache_dtype,
        # the CPU's budget stands in for a GPU's: no CUDA context in it
        fixed_overhead_bytes=fit.DEFAULT_OVERHEAD_BYTES if device.type == "cuda" else 0,
        fp8_matmuls=fp8.matmuls_supported(device, dtype),
    )
    if not estimate.fits:
        raise fit.DoesNotFit(estimate)
    log.info(
        "fit check: %.2f of %.2f GiB usable per device",
        estimate.needed_bytes / fit.GIB,
        estimate.usable_bytes / fit.GIB,
    )


def pick_device(name: str, tp_size: int = 1, tp_rank: int = 0) -> torch.device:
    """The device of a rank: as configured; with tensor parallelism, GPU `rank` of those visible."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and tp_size > 1:
        if torch.cuda.device_count() < tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} needs {tp_size} GPUs; {torch.cuda.device_count()} visible"
            )
        return torch.device("cuda", tp_rank)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelRunner:
    """One rank's model and KV cache. Rank 0 (tp_rank=0) is the engine's: with tensor parallelism it starts
    the other ranks' processes, which build the same runner on their shard (engine/tp_workers.py)."""

    def __init__(self, config: EngineConfig, info: ModelInfo, max_model_len: int, tp_rank: int = 0, port: int = 0):
        self.config = config
        self.info = info
        tp = config.tensor_parallel_size
        self.device = pick_device(config.device, tp, tp_rank)
        self.block_size = config.block_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.workers: Workers | None = None
        check_workers = None  # rank 0: raises if a worker process has exited
        if tp_rank == 0:  # before any weight is read or any other rank started
            check_fit(config, max_model_len, self.device, info.dtype)
        if tp > 1 and tp_rank == 0:
            parallel.check_divisible(info.shape, tp)
            self.workers = Workers(type(self), config, info, max_model_len)
            port, check_workers = self.workers.port, self.workers.check
        parallel.init_group(tp_rank, tp, port, self.device, check_workers)
        triton = kernels.select(config.kernels, self.device, info.shape.head_dim)
        if tp_rank == 0:  # the start-up phases the operator reads from the log (no HTTP until the server is ready)
            print(startup_line(LOADING_WEIGHTS), file=sys.stderr, flush=True)
        self.model = load_model(config.model, info, self.device, max_model_len, config.quantization, config.load_format)
        if tp_rank == 0:  # then the KV cache, CUDA graphs and the server's first forward
            print(startup_line(WARMING_UP), file=sys.stderr, flush=True)
        # the projections wrapped for LoRA adapters, whose weights the core's LoraManager (engine/lora.py) places
        self.lora = lora.LoraModel(self.model, config.max_loras, config.max_lora_rank) if config.enable_lora else None
        self.sampler = Sampler(self.device, config.seed)
        shape = info.shape
        kv_heads = shape.num_kv_heads // tp  # this rank's
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, info.dtype)  # FP8: one byte a value, 2× the blocks
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        self.block_bytes = 2 * shape.num_layers * self.block_size * kv_heads * shape.head_dim * elem
        self.num_gpu_blocks = config.num_gpu_blocks or self._kv_budget_blocks()
        if tp > 1:  # block tables are shared: every rank holds as many blocks as the tightest one
            parallel.checkpoint("loaded", check_workers)
            blocks = torch.tensor([self.num_gpu_blocks], device=self.device)
            self.num_gpu_blocks = int(parallel.all_reduce(blocks, torch.distributed.ReduceOp.MIN))
        self.num_cpu_blocks = (
            config.num_cpu_blocks if config.num_cpu_blocks is not None else config.swap_space_bytes // self.block_bytes
        )
        if config.preemption_mode != "swap":
            self.num_cpu_blocks = 0
        # one extra block the block manager never hands out: padded rows of a CUDA-graph batch write there
        self.scratch_block = self.num_gpu_blocks
        kv_shape = (shape.num_layers, 2, self.num_gpu_blocks + 1, self.block_size, kv_heads, shape.head_dim)
        self.kv_cache = torch.zeros(kv_shape, dtype=self.kv_dtype, device=self.device)
        self.kv_cache_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        self._memory: tuple[float, int | None, int | None] = (float("-inf"), None, None)
        cpu_shape = (shape.num_layers, 2, self.num_cpu_blocks, self.block_size, kv_heads, shape.head_dim)
        self.cpu_cache = torch.zeros(cpu_shape, dtype=self.kv_dtype, pin_memory=self.device.type == "cuda")
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.kv_cache[i, 0]
            layer.self_attn.v_cache = self.kv_cache[i, 1]
        self.max_model_len = max_model_len
        self.host_tables = HostBlockTables(
            max(config.max_num_seqs, 1), (max_model_len + self.block_size - 1) // self.block_size
        )
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | _EagerReplay, torch.Tensor]] = {}
        # graphs need the Triton kernels (no host-side shapes), and no LoRA: its rows are host data per step
        if not config.enforce_eager and triton and self.lora is None:
            self._capture_decode_graphs()
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %s), swap pool %d blocks, device %s, dtype %s, %s kernels%s",
            self.num_gpu_blocks,
            self.block_size,
            self.num_gpu_blocks * self.block_bytes / 2**20,
            self.kv_dtype,
            self.num_cpu_blocks,
            self.device,
            info.dtype,
            "Triton" if triton else "torch",
            f", tensor-parallel rank {tp_rank} of {tp}" if tp > 1 else "",
        )

    def close(self) -> None:
        """Stop the other ranks (rank 0); a runner without them has nothing to stop."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def device_memory(self) -> tuple[int | None, int | None]:
        """(used, total) bytes of this rank's device as the driver counts them (every process on it, as
        nvidia-smi); (None, None) on a CPU. Read at most once a second: the snapshot is built every step."""
        if self.device.type != "cuda":
            return None, None
        now = time.monotonic()
        if now - self._memory[0] >= 1.0:
            free, total = torch.cuda.mem_get_info(self.device)
            self._memory = (now, total - free, total)
        return self._memory[1], self._memory[2]

    def _kv_budget_blocks(self) -> int:
        if self.device.type != "cuda":
            return max(self.config.cpu_kv_cache_bytes // self.block_bytes, 1)
        # peak activation memory of the largest step, measured on a dummy forward through the MLPs (the
        # fused attention kernels add little); what is left of the budget holds KV blocks
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        n = self.config.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model.model.embed_tokens(ids)
            for layer in self.model.model.layers:
                hidden = layer.mlp(layer.post_attention_layernorm(hidden))
            self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs) :]).float()  # the torch sampler's copy
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        current = torch.cuda.memory_allocated()
        budget = total * self.config.gpu_memory_utilization - (total - free) - (peak - current)
        return max(int(budget // self.block_bytes), 1)

    # ------------------------------------------------------------------ CUDA graphs (decode-only steps)
    def _capture_decode_graphs(self) -> None:
        """Capture the model's forward for decode batches at a ladder of sizes; replays skip ~2k launches.
        On the CPU (kernels='triton' under Triton's interpreter) there are no graphs: each "replay" reruns the
        forward on the same static buffers, so the CPU tests cover the graph path's batch handling."""
        max_bs = min(self.config.max_num_seqs, 512)
        sizes = sorted({1, 2, 4, 8, *range(16, max_bs + 1, 16), max_bs})
        width = (self.max_model_len + self.block_size - 1) // self.block_size
        dev = self.device
        self.g_input = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), self.scratch_block * self.block_size, dtype=torch.long, device=dev)
        self.g_tables = torch.full((max_bs, width), self.scratch_block, dtype=torch.long, device=dev)
        self.g_context = torch.ones(max_bs, dtype=torch.long, device=dev)
        pool = None
        with torch.inference_mode():
            for bs in reversed(sizes):  # largest first: the others reuse its memory pool
                # a replay may see any context up to the model's length: size the decode split for that
                meta = AttentionMetadata(
                    self.g_slots[:bs],
                    self.g_tables[:bs],
                    self.g_context[:bs],
                    [1] * bs,
                    [1] * bs,
                    bs,
                    max_decode_context=self.max_model_len,
                )
                if dev.type != "cuda":
                    hidden = torch.empty(bs, self.info.shape.hidden_size, dtype=self.info.dtype)
                    self.graphs[bs] = (_EagerReplay(self, meta, hidden), hidden)
                    continue
                set_context(meta)
                self.model(self.g_input[:bs], self.g_positions[:bs])  # warm-up: Triton compiles outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    hidden = self.model(self.g_input[:bs], self.g_positions[:bs])
                pool = graph.pool()
                self.graphs[bs] = (graph, hidden)
                set_context(None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        log.info("decode graphs (%s) for batch sizes %s", "CUDA" if dev.type == "cuda" else "eager replays", sizes)

    def _decode_plan(self, seqs: list[Sequence], positions: list[int | None], input_ids: list[int] | None) -> StepPlan:
        """The plan of a decode step (one-token rows, every row sampled): a graph replay at the smallest
        captured size that fits, padded to it, or an eager forward beyond the largest. A None position is a
        row that computes nothing useful: it attends to one token and writes its K/V to the scratch block.
        input_ids None: the tokens of the step before, taken on the device."""
        n, bs, scratch = len(seqs), self.block_size, self.scratch_block * self.block_size
        pos, slots, ctx = [], [], []
        for seq, p in zip(seqs, positions):
            if p is None:
                pos.append(0)
                slots.append(scratch)
                ctx.append(1)
            else:
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                ctx.append(p + 1)
        tables = self.host_tables.fill(seqs)
        size = next((size for size in sorted(self.graphs) if size >= n), None)
        if size is None:
            plan = StepPlan(n, input_ids, pos, slots, ctx, tables, [1] * n, n)
            if self.lora is not None:
                plan.lora_rows = lora.runs_of([seq.lora_slot for seq in seqs])
            return plan
        # padded rows (n … size-1) attend to one token through whatever table their row holds and write
        # their K/V to the scratch block; their outputs are dropped
        pad = size - n
        return StepPlan(
            n,
            None if input_ids is None else input_ids + [0] * pad,
            pos + [0] * pad,
            slots + [scratch] * pad,
            ctx + [1] * pad,
            tables,
            None,
            n,
            graph_size=size,
        )

    def _replay(self, plan: StepPlan, input_ids: torch.Tensor | None) -> torch.Tensor:
        size, n = plan.graph_size, plan.num_rows
        graph, hidden = self.graphs[size]
        rows = [plan.positions, plan.slots, plan.context_lens] + ([plan.input_ids] if input_ids is None else [])
        dev = to_device(rows, self.device)
        self.g_positions[:size].copy_(dev[0])
        self.g_slots[:size].copy_(dev[1])
        self.g_context[:size].copy_(dev[2])
        if input_ids is None:
            self.g_input[:size].copy_(dev[3])
        else:
            self.g_input[:n].copy_(input_ids)
        self.g_tables[:n, : plan.tables.shape[1]].copy_(to_device(plan.tables, self.device))
        graph.replay()
        return hidden[:n]

    # ------------------------------------------------------------------ swapping
    def _copy_blocks(self, mapping: list[tuple[int, int]], src: torch.Tensor, dst: torch.Tensor) -> None:
        if not mapping:
            return
        s = torch.tensor([a for a, _ in mapping], dtype=torch.long)
        d = torch.tensor([b for _, b in mapping], dtype=torch.long)
        if src.device != s.device:
            s = s.to(src.device)
        dst_index = d.to(dst.device)
        if is_fp8(src):  # indexing FP8 tensors is not implemented everywhere: move the bytes
            src, dst = src.view(torch.uint8), dst.view(torch.uint8)
        # to the host: a blocking copy, since the host indexes the result at once; to the device: queued
        dst[:, :, dst_index] = src[:, :, s].to(dst.device, non_blocking=dst.device.type != "cpu")

    # ------------------------------------------------------------------ a step
    def _prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[StepPlan, list[tuple[Sequence, int, int]]]:
        """The plan of a mixed batch (decodes first), run eagerly, and the spans of prompt positions whose
        logits give prompt logprobs (their rows follow the sampled ones in sample_rows). Per-token values
        (positions, cache slots) are computed with numpy over the whole batch: an 8k-token prefill step is 8k
        of each."""
        input_ids: list[int] = []
        starts, query_lens, context_lens, sample_rows = [], [], [], []
        prompt_rows: list[int] = []
        draft_rows: list[int] = []
        spans: list[tuple[Sequence, int, int]] = []
        for seq, n in batch:
            start = seq.num_computed_tokens
            base = len(input_ids)
            input_ids.extend(seq.token_ids[start : start + n])
            if seq.draft_token_ids:  # the last token, then the draft: every row's choice is checked
                input_ids.extend(seq.draft_token_ids)
                draft_rows.extend(range(base, len(input_ids) - 1))
            starts.append(start)
            query_lens.append(n)
            context_lens.append(start + n)
            if start + n == len(seq) + len(seq.draft_token_ids):  # complete: this step yields a token
                sample_rows.append(len(input_ids) - 1)
            if seq.prompt_logprobs is not None:  # position q scores prompt token q + 1; each is scored once
                first, last = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows.extend(range(base + first - start, base + last - start))
                    spans.append((seq, first, last - first))
        tables = self.host_tables.fill([seq for seq, _ in batch])  # also fills host_tables.array's rows
        qlens = np.array(query_lens)
        row_of_token = np.repeat(np.arange(len(batch)), qlens)
        positions = np.arange(len(input_ids)) + np.repeat(np.array(starts) - (np.cumsum(qlens) - qlens), qlens)
        slots = self.host_tables.array[row_of_token, positions // self.block_size] * self.block_size
        slots += positions % self.block_size
        plan = StepPlan(
            len(input_ids),
            input_ids,
            positions,
            slots,
            context_lens,
            tables,
            query_lens,
            sum(1 for q in query_lens if q == 1),
            sample_rows + draft_rows + prompt_rows,
        )
        if self.lora is not None:
            plan.lora_rows = lora.runs_of([seq.lora_slot for seq, _ in batch], query_lens)
        return plan, spans

    def run_plan(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Swap blocks and run the forward a plan describes; the hidden states of the rows to sample.
        Every rank of a tensor-parallel group runs this with the same plan (input ids given: on the device)."""
        self._copy_blocks(plan.swap_out, self.kv_cache, self.cpu_cache)
        self._copy_blocks(plan.swap_in, self.cpu_cache, self.kv_cache)
        if not plan.num_rows:
            return None
        if plan.graph_size:
            return self._replay(plan, input_ids)
        dev = self.device
        if input_ids is None:
            input_ids = to_device(plan.input_ids, dev)
        meta = AttentionMetadata(
            to_device(plan.slots, dev),
            to_device(plan.tables, dev),
            to_device(plan.context_lens, dev),
            plan.query_lens,
            plan.context_lens,
            plan.num_decodes,
        )
        lora.set_rows(plan.lora_rows)
        try:
            hidden = self._forward(input_ids, to_device(plan.positions, dev), meta)
        finally:
            lora.set_rows([])
        return hidden if plan.sample_rows is None else hidden[to_device(plan.sample_rows, dev)]

    def _run(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Rank 0: run a plan here and on the other ranks (their ids, if on the device, by broadcast)."""
        if self.workers is not None:
            self.workers.send(plan)
            if input_ids is not None:
                torch.distributed.broadcast(input_ids.contiguous(), 0)
        return self.run_plan(plan, input_ids)

    def run_plan_as_worker(self, plan: StepPlan) -> None:
        """Ranks ≥ 1: the same forward as rank 0, and the same logits collective; rank 0 samples."""
        input_ids = None
        if plan.input_ids is None:
            input_ids = torch.empty(plan.num_rows, dtype=torch.long, device=self.device)
            torch.distributed.broadcast(input_ids, 0)
        with torch.inference_mode():
            hidden = self.run_plan(plan, input_ids)
            if hidden is not None and len(hidden):
                self.model.compute_logits(hidden)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queue one scheduled step on the device, sampling included; nothing waits for it here."""
        # decodes first: attention handles them as one padded batch; then by LoRA slot, so that each adapter's
        # rows are one run (model/lora.py)
        if self.lora is None:
            batch = sorted(out.scheduled, key=lambda item: item[1] != 1)
        else:
            batch = sorted(out.scheduled, key=lambda item: (item[1] != 1, item[0].lora_slot))
        sampling = [seq for seq, n in batch if seq.num_computed_tokens + n == len(seq) + len(seq.draft_token_ids)]
        spans = None  # a decode step scores no prompt position
        if not batch:
            plan = StepPlan(0)
        elif self.graphs and len(sampling) == len(batch) <= max(self.graphs) and all(n == 1 for _, n in batch):
            positions = [seq.num_computed_tokens for seq in sampling]  # every row is a decode that samples
            plan = self._decode_plan(sampling, positions, [seq.token_ids[p] for seq, p in zip(sampling, positions)])
        else:
            plan, spans = self._prepare(batch)
        plan.swap_out, plan.swap_in = out.swap_out, out.swap_in
        # each sampled row decides the token after everything its sequence computes here, draft included
        positions = [len(seq) + len(seq.draft_token_ids) for seq in sampling]
        return self._sample(self._run(plan), sampling, positions, spans)

    @torch.inference_mode()
    def launch_ahead(self, prev: LaunchedStep, keep: list[int], positions: list[int | None]) -> LaunchedStep:
        """Queue the next decode step of rows `keep` of `prev` before prev's tokens reach the host: each row's
        input is its token from prev, taken on the device, at the given position (None: the sequence ends
        with prev's token; the row computes nothing useful)."""
        seqs = [prev.sampling[i] for i in keep]
        ids = prev.sampled.tokens
        if len(keep) != len(prev.sampling):
            ids = ids.index_select(0, to_device(keep, self.device))
        decides = [0 if p is None else p + 1 for p in positions]  # the input at p decides token p + 1
        return self._sample(self._run(self._decode_plan(seqs, positions, None), ids), seqs, decides)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        set_context(meta)
        try:
            return self.model(input_ids, positions)
        finally:
            set_context(None)

    def _sample(
        self, hidden: torch.Tensor | None, sampling: list[Sequence], positions: list[int], spans: list | None = None
    ) -> LaunchedStep:
        """positions: the index of the token each sampled row decides (the sampler keys seeded noise by it)."""
        drafting = [seq for seq in sampling if seq.draft_token_ids] if spans is not None else []
        if spans or drafting:  # hidden: the sampled rows, the draft positions, the prompt positions scored
            logits = self.model.compute_logits(hidden)
            k = len(sampling)
            d = k + sum(len(seq.draft_token_ids) for seq in drafting)
            prompt = self.sampler.prompt_logprobs(logits[d:], spans) if spans else None
            sampled = self.sampler.sample(logits[:k], sampling, positions) if sampling else None
            drafts = None
            if drafting:  # every draft position sampled as plain decoding would sample that token
                rows, draft_positions = draft_rows(drafting)
                drafts = DraftCheck(drafting, self.sampler.sample(logits[k:d], rows, draft_positions))
            return LaunchedStep(sampling, sampled, prompt, drafts)
        if not sampling:
            return LaunchedStep([], None)
        return LaunchedStep(sampling, self.sampler.sample(self.model.compute_logits(hidden), sampling, positions))

    @staticmethod
    def _settle_drafts(step: LaunchedStep, tokens: list[int]) -> None:
        """Accept each draft while the samples agree with it; that sequence's token becomes the first sample
        that differs (its sampled token stands only when the whole draft is accepted)."""
        check = step.drafts
        if check.samples.ready is not None:
            check.samples.ready.synchronize()
        choices = check.samples.host.tolist()
        step.accepted = {}
        row = {id(seq): i for i, seq in enumerate(step.sampling)}
        offset = 0
        for seq in check.seqs:
            draft = seq.draft_token_ids
            i = row[id(seq)]
            out = accept(draft, choices[offset : offset + len(draft)] + [tokens[i]])
            offset += len(draft)
            step.accepted[seq.seq_id] = out[:-1]
            tokens[i] = out[-1]

    @torch.inference_mode()
    def collect(self, step: LaunchedStep) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Wait for a launched step; its sampled sequences, their tokens and logprobs, on the host (prompt
        logprobs go to their sequences)."""
        if step.prompt is not None:
            self.sampler.prompt_logprobs_to_host(step.prompt)
        if not step.sampling:
            return [], [], []
        tokens, logprobs = self.sampler.to_host(step.sampled, step.sampling)
        if step.drafts is not None:
            self._settle_drafts(step, tokens)
        return step.sampling, tokens, logprobs
