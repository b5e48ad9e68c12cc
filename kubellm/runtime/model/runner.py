"""ModelRunner: owns the device, the model, the KV cache and its CPU swap pool; turns a scheduled batch
into input tensors and attention metadata, runs the forward, and samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.scheduler import SchedulerOutput
from kubellm.runtime.engine.sequence import Sequence, TokenLogprob
from kubellm.runtime.model import kernels
from kubellm.runtime.model.attention import AttentionMetadata, set_context
from kubellm.runtime.model.loader import ModelInfo, load_model
from kubellm.runtime.model.sampler import SampledTokens, Sampler, to_device

log = logging.getLogger("kubellm.runner")


@dataclass
class LaunchedStep:
    """A step queued on the device: one sampled token per sequence in `sampling`."""

    sampling: list[Sequence]
    sampled: SampledTokens | None


class HostBlockTables:
    """The block tables of the current batch, row by row, in a host buffer kept across steps.

    Block tables only grow (the block manager assigns a new list when it resets one), so a sequence found
    in the same row as last step only has its new blocks written: a few writes per step instead of
    rebuilding a [batch, blocks] table (milliseconds at 256 sequences). Entries past a row's length are
    stale but never read: every read is bounded by the sequence's context length. fill() returns a fresh
    contiguous copy, so the buffer may change while a device copy from the last step is still queued.
    """

    def __init__(self, rows: int, cols: int):
        self.tensor = torch.zeros(rows, cols, dtype=torch.long)
        self.array = self.tensor.numpy()
        self.owner: list[list[int] | None] = [None] * rows  # the block_table list each row mirrors
        self.written = [0] * rows

    def fill(self, seqs: list[Sequence]) -> torch.Tensor:
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
        return self.tensor[: len(seqs), :width].clone()


class _EagerReplay:
    """A decode "graph" where CUDA graphs do not exist: replay() runs the forward on the static buffers."""

    def __init__(self, runner: "ModelRunner", meta: AttentionMetadata, hidden: torch.Tensor):
        self.runner, self.meta, self.hidden = runner, meta, hidden

    def replay(self) -> None:
        n, r = self.meta.num_decodes, self.runner
        self.hidden.copy_(r._forward(r.g_input[:n], r.g_positions[:n], self.meta))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelRunner:
    def __init__(self, config: EngineConfig, info: ModelInfo, max_model_len: int):
        self.config = config
        self.info = info
        self.device = pick_device(config.device)
        self.block_size = config.block_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        triton = kernels.select(config.kernels, self.device, info.shape.head_dim)
        self.model = load_model(config.model, info, self.device, max_model_len)
        self.sampler = Sampler(self.device, config.seed)
        shape = info.shape
        elem = torch.tensor([], dtype=info.dtype).element_size()
        self.block_bytes = 2 * shape.num_layers * self.block_size * shape.num_kv_heads * shape.head_dim * elem
        self.num_gpu_blocks = config.num_gpu_blocks or self._kv_budget_blocks()
        self.num_cpu_blocks = (
            config.num_cpu_blocks if config.num_cpu_blocks is not None else config.swap_space_bytes // self.block_bytes
        )
        if config.preemption_mode != "swap":
            self.num_cpu_blocks = 0
        # one extra block the block manager never hands out: padded rows of a CUDA-graph batch write there
        self.scratch_block = self.num_gpu_blocks
        kv_shape = (shape.num_layers, 2, self.num_gpu_blocks + 1, self.block_size, shape.num_kv_heads, shape.head_dim)
        self.kv_cache = torch.zeros(kv_shape, dtype=info.dtype, device=self.device)
        cpu_shape = (shape.num_layers, 2, self.num_cpu_blocks, self.block_size, shape.num_kv_heads, shape.head_dim)
        self.cpu_cache = torch.zeros(cpu_shape, dtype=info.dtype, pin_memory=self.device.type == "cuda")
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.kv_cache[i, 0]
            layer.self_attn.v_cache = self.kv_cache[i, 1]
        self.max_model_len = max_model_len
        self.host_tables = HostBlockTables(max(config.max_num_seqs, 1), (max_model_len + self.block_size - 1) //
                                           self.block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | _EagerReplay, torch.Tensor]] = {}
        if not config.enforce_eager and triton:  # graphs need the Triton kernels (no host-side shapes)
            self._capture_decode_graphs()
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), swap pool %d blocks, device %s, dtype %s, %s kernels",
            self.num_gpu_blocks, self.block_size, self.num_gpu_blocks * self.block_bytes / 2**20,
            self.num_cpu_blocks, self.device, info.dtype, "Triton" if triton else "torch",
        )

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
            self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs) :])
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
                meta = AttentionMetadata(self.g_slots[:bs], self.g_tables[:bs], self.g_context[:bs], [1] * bs,
                                         [1] * bs, bs, max_decode_context=self.max_model_len)
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

    def _decode_rows(self, seqs: list[Sequence], positions: list[int | None]) -> tuple[list, list, list]:
        """(positions, cache slots, context lengths) of one-token rows. A None position is a row that computes
        nothing useful: it attends to one token and writes its K/V to the scratch block."""
        bs = self.block_size
        pos, slots, ctx = [], [], []
        for seq, p in zip(seqs, positions):
            if p is None:
                pos.append(0)
                slots.append(self.scratch_block * bs)
                ctx.append(1)
            else:
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                ctx.append(p + 1)
        return pos, slots, ctx

    def _run_graph(self, seqs: list[Sequence], positions: list[int | None],
                   input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Replay the smallest captured decode graph that fits; input ids from the host, or already on the
        device (a step launched before the previous one's tokens reached the host)."""
        n = len(seqs)
        bs = next(size for size in sorted(self.graphs) if size >= n)
        graph, hidden = self.graphs[bs]
        pos, slots, ctx = self._decode_rows(seqs, positions)
        tables = self.host_tables.fill(seqs)
        # padded rows (n … bs-1) attend to one token through whatever table their row holds and write
        # their K/V to the scratch block; their outputs are dropped
        pad = bs - n
        rows = [pos + [0] * pad, slots + [self.scratch_block * self.block_size] * pad, ctx + [1] * pad]
        if isinstance(input_ids, list):
            rows.append(input_ids + [0] * pad)
        dev = to_device(rows, self.device)
        self.g_positions[:bs].copy_(dev[0])
        self.g_slots[:bs].copy_(dev[1])
        self.g_context[:bs].copy_(dev[2])
        if isinstance(input_ids, list):
            self.g_input[:bs].copy_(dev[3])
        else:
            self.g_input[:n].copy_(input_ids)
        self.g_tables[:n, : tables.shape[1]].copy_(to_device(tables, self.device))
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
        # to the host: a blocking copy, since the host indexes the result at once; to the device: queued
        dst[:, :, dst_index] = src[:, :, s].to(dst.device, non_blocking=dst.device.type != "cpu")

    # ------------------------------------------------------------------ a step
    def _prepare(self, batch: list[tuple[Sequence, int]]):
        """Inputs and attention metadata of a mixed batch (decodes first). Per-token values (positions, cache
        slots) are computed with numpy over the whole batch: an 8k-token prefill step is 8k of each."""
        input_ids: list[int] = []
        starts, query_lens, context_lens, sample_rows = [], [], [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            starts.append(start)
            query_lens.append(n)
            context_lens.append(start + n)
            if start + n == len(seq):  # the prompt (or recompute) is complete: this step yields a token
                sample_rows.append(len(input_ids) - 1)
        tables = self.host_tables.fill([seq for seq, _ in batch])  # also fills host_tables.array's rows
        qlens = np.array(query_lens)
        row_of_token = np.repeat(np.arange(len(batch)), qlens)
        positions = np.arange(len(input_ids)) + np.repeat(np.array(starts) - (np.cumsum(qlens) - qlens), qlens)
        slots = self.host_tables.array[row_of_token, positions // self.block_size] * self.block_size
        slots += positions % self.block_size
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(torch.from_numpy(slots), dev),
            block_tables=to_device(tables, dev),
            context_lens=to_device(context_lens, dev),
            query_lens=query_lens,
            context_lens_list=context_lens,
            num_decodes=sum(1 for q in query_lens if q == 1),
        )
        return to_device(input_ids, dev), to_device(torch.from_numpy(positions), dev), meta, to_device(sample_rows, dev)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Run one scheduled step; returns the sequences that produced a token, the tokens and logprobs."""
        return self.collect(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queue one scheduled step on the device, sampling included; nothing waits for it here."""
        self._copy_blocks(out.swap_out, self.kv_cache, self.cpu_cache)
        self._copy_blocks(out.swap_in, self.cpu_cache, self.kv_cache)
        if not out.scheduled:
            return LaunchedStep([], None)
        # decodes first: attention handles them as one padded batch
        batch = sorted(out.scheduled, key=lambda item: item[1] != 1)
        sampling = [seq for seq, n in batch if seq.num_computed_tokens + n == len(seq)]
        if self.graphs and len(sampling) == len(batch) <= max(self.graphs) and all(n == 1 for _, n in batch):
            positions = [seq.num_computed_tokens for seq in sampling]  # every row is a decode that samples
            hidden = self._run_graph(sampling, positions, [seq.token_ids[p] for seq, p in zip(sampling, positions)])
        else:
            input_ids, positions, meta, sample_rows = self._prepare(batch)
            hidden = self._forward(input_ids, positions, meta)[sample_rows]
        return self._sample(hidden, sampling)

    @torch.inference_mode()
    def launch_ahead(self, prev: LaunchedStep, keep: list[int], positions: list[int | None]) -> LaunchedStep:
        """Queue the next decode step of rows `keep` of `prev` before prev's tokens reach the host: each row's
        input is its token from prev, taken on the device, at the given position (None: the sequence ends
        with prev's token; the row computes nothing useful)."""
        seqs = [prev.sampling[i] for i in keep]
        ids = prev.sampled.tokens
        if len(keep) != len(prev.sampling):
            ids = ids.index_select(0, to_device(keep, self.device))
        if self.graphs and len(seqs) <= max(self.graphs):
            hidden = self._run_graph(seqs, positions, ids)
        else:
            pos, slots, ctx = self._decode_rows(seqs, positions)
            tables = to_device(self.host_tables.fill(seqs), self.device)
            meta = AttentionMetadata(to_device(slots, self.device), tables, to_device(ctx, self.device),
                                     [1] * len(seqs), ctx, len(seqs))
            hidden = self._forward(ids, to_device(pos, self.device), meta)
        return self._sample(hidden, seqs)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        set_context(meta)
        try:
            return self.model(input_ids, positions)
        finally:
            set_context(None)

    def _sample(self, hidden: torch.Tensor, sampling: list[Sequence]) -> LaunchedStep:
        if not sampling:
            return LaunchedStep([], None)
        return LaunchedStep(sampling, self.sampler.sample(self.model.compute_logits(hidden), sampling))

    @torch.inference_mode()
    def collect(self, step: LaunchedStep) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Wait for a launched step; its sampled sequences, their tokens and logprobs, on the host."""
        if not step.sampling:
            return [], [], []
        tokens, logprobs = self.sampler.to_host(step.sampled, step.sampling)
        return step.sampling, tokens, logprobs
