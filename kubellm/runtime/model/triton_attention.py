"""Triton paged decode attention for the CUDA path: one program per (sequence, KV head) reads the sequence's
KV blocks straight from the paged cache (no gather), serving all query heads of its GQA group with an
online softmax. When a batch has too few programs to fill the GPU (few long sequences), each context is
split into partitions run in parallel and merged by a second kernel (vLLM's paged attention v2).
fp32 runs with IEEE dot products, so the GPU path stays exact against HF in fp32.
An FP8 cache (attention.py) is read as FP8 — half the bytes of bf16 — and dequantized on read: each key
and value tile becomes fp32 × its layer's scale, rounded to the compute dtype, as the torch path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARTITION_TOKENS = 512  # KV tokens per program when a long context is split (at least)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_PARTITIONS = 16  # per context: under CUDA graphs the grid covers the model's whole length, mostly idle


@triton.jit
def _dequantize(x, scale, dtype, FP8: tl.constexpr):
    """A tile of K or V from the cache in the compute dtype (an FP8 cache: value × scale in fp32, rounded)."""
    if FP8:
        return (x.to(tl.float32) * scale).to(dtype)
    return x


@triton.jit
def _online_softmax_block(acc, l_i, m_i, q, k, v, scale, mask, IEEE: tl.constexpr):
    """Fold one block of keys and values into an online softmax's running (output, sum, max) per query row.
    mask: which scores count (None: all of them)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if mask is not None:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, l_i, m_new


# integer arguments that change between calls are not specialized on (== 1, divisible by 16): otherwise a
# new value can trigger a compile in the middle of serving
@triton.jit(do_not_specialize=["num_parts", "part_tokens"])
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    scale,
    k_scale,
    v_scale,
    stride_q_seq,
    stride_q_head,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_bt_seq,
    stride_o_seq,
    stride_o_head,
    num_parts,
    part_tokens,
    NUM_HEADS: tl.constexpr,
    SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    """One program: one sequence, one KV head (all its query heads), one partition of the context. With one
    partition it writes the output; otherwise the unnormalized accumulator and (max, sum) for the reduce."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    begin = part * part_tokens
    if begin < ctx:  # partitions past the context (CUDA graphs size the grid for the longest) do nothing
        end = tl.minimum(ctx, begin + part_tokens)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        g_mask = offs_g < GROUP
        heads = kv_head * GROUP + offs_g
        q = tl.load(
            q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
            mask=g_mask[:, None],
            other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        offs_t = tl.arange(0, TOKENS)
        for start in range(begin, end, TOKENS):
            pos = start + offs_t
            valid = pos < end
            block_ids = tl.load(block_tables_ptr + seq * stride_bt_seq + pos // BLOCK_SIZE, mask=valid, other=0)
            base = block_ids * stride_c_block + (pos % BLOCK_SIZE) * stride_c_tok + kv_head * stride_c_head
            k = tl.load(k_cache_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            k = _dequantize(k, k_scale, q.dtype, FP8)
            v = _dequantize(v, v_scale, q.dtype, FP8)
            acc, l_i, m_i = _online_softmax_block(acc, l_i, m_i, q, k, v, scale, valid[None, :], IEEE)
        if not SPLIT:
            tl.store(
                out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + offs_d[None, :],
                (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None],
            )
        else:
            row = (seq * NUM_HEADS + heads) * num_parts + part  # [GROUP_PAD] rows of the partial buffers
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])
            tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["num_parts", "part_tokens"])
def _reduce_partitions_kernel(
    part_acc_ptr,
    part_ml_ptr,
    context_lens_ptr,
    out_ptr,
    stride_o_seq,
    stride_o_head,
    num_parts,
    part_tokens,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per (sequence, query head): rescale every used partition to the global max and sum,
    CHUNK partitions at a time (the grid may be sized for far longer contexts than this one)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    used = tl.cdiv(tl.load(context_lens_ptr + seq), part_tokens)
    first = (seq * NUM_HEADS + head) * num_parts
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    m_max = tl.full([CHUNK], float("-inf"), tl.float32)
    for c in range(0, used, CHUNK):
        live = c + offs_c < used
        m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (first + c + offs_c) * 2, mask=live, other=float("-inf")))
    m_all = tl.max(m_max, 0)
    total = tl.zeros([CHUNK], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for c in range(0, used, CHUNK):
        rows = first + c + offs_c
        live = c + offs_c < used
        m = tl.load(part_ml_ptr + rows * 2, mask=live, other=float("-inf"))
        w = tl.where(live, tl.exp(m - m_all), 0.0)
        total += w * tl.load(part_ml_ptr + rows * 2 + 1, mask=live, other=0.0)
        part = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
    out = acc / tl.sum(total, 0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty))


def decode_launch(head_dim: int) -> tuple[int, int, int]:
    """(KV tokens per loop iteration, num_warps, num_stages) of the decode kernel: the fastest launch of
    bench/kernels.py's sweep for each head_dim (figures in bench/RESULTS.md); head_dim 64 tiles are half the
    bytes of 128's, so they take half the tokens on half the warps."""
    return (32, 2, 3) if head_dim <= 64 else (64, 4, 3)


def split_plan(
    seqs: int, kv_heads: int, max_context_len: int, device: torch.device, part_tokens: int, tokens: int
) -> tuple[int, int]:
    """(partitions, tokens per partition). Contexts are split only when there are too few (sequence, KV
    head) programs to fill the GPU, into at most MAX_PARTITIONS of at least part_tokens tokens. (Triton's
    CPU interpreter has no SMs to fill: it always splits, so the CPU tests cover the split path.)"""
    parts = min(triton.cdiv(max_context_len, part_tokens), MAX_PARTITIONS)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if seqs * kv_heads >= 2 * sms:
            parts = 1
    if parts <= 1:
        return 1, 1 << 30
    per = triton.cdiv(triton.cdiv(max_context_len, parts), tokens) * tokens
    return triton.cdiv(max_context_len, per), per


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    part_tokens: int = PARTITION_TOKENS,
    out: torch.Tensor | None = None,
    launch: tuple[int, int, int] | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """q: [seqs, heads, head_dim] (one token per sequence); caches: [blocks, block_size, kv_heads, head_dim]
    in q's dtype, or FP8 holding K / kv_scales[0] and V / kv_scales[1].
    max_context_len bounds every context (under CUDA graphs: the model's length), sizing the split. Written
    into `out` when given (rows of the whole batch's output: no copy afterwards). `launch` overrides
    decode_launch(head_dim) (bench/kernels.py sweeps it)."""
    seqs, heads, head_dim = q.shape
    tokens, num_warps, num_stages = launch or decode_launch(head_dim)
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    parts, per_part = split_plan(seqs, kv_heads, max_context_len, q.device, part_tokens, tokens)
    out = torch.empty_like(q) if out is None else out
    if parts > 1:
        part_acc = torch.empty(seqs * heads * parts, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(seqs * heads * parts, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _paged_decode_kernel[(seqs, kv_heads, parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_acc,
        part_ml,
        scale,
        *kv_scales,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        parts,
        per_part,
        NUM_HEADS=heads,
        SPLIT=parts > 1,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TOKENS=tokens,
        IEEE=q.dtype == torch.float32,
        FP8=k_cache.dtype in FP8_DTYPES,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if parts > 1:
        _reduce_partitions_kernel[(seqs, heads)](
            part_acc,
            part_ml,
            context_lens,
            out,
            out.stride(0),
            out.stride(1),
            parts,
            per_part,
            NUM_HEADS=heads,
            HEAD_DIM=head_dim,
            CHUNK=16,
        )
    return out


@triton.jit
def _prefill_blocks(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    kv_offset,
    offs_d,
    scale,
    kv_scales,
    lo,
    hi,
    stride_c_block,
    stride_c_tok,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    """Online softmax over keys lo … hi-1, BLOCK_N at a time. MASKED: the blocks on the tile's diagonal
    (causal mask, a partial last block); otherwise every key is visible to every query and nothing is masked."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        if MASKED:
            valid = pos < hi
            block_ids = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
        else:
            block_ids = tl.load(table_ptr + pos // BLOCK_SIZE)
        base = block_ids * stride_c_block + (pos % BLOCK_SIZE) * stride_c_tok + kv_offset
        if MASKED:
            k = tl.load(k_cache_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + base[:, None] + offs_d[None, :])
            v = tl.load(v_cache_ptr + base[:, None] + offs_d[None, :])
        k = _dequantize(k, kv_scales[0], q.dtype, FP8)
        v = _dequantize(v, kv_scales[1], q.dtype, FP8)
        if MASKED:
            causal = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            acc, l_i, m_i = _online_softmax_block(acc, l_i, m_i, q, k, v, scale, causal, IEEE)
        else:
            acc, l_i, m_i = _online_softmax_block(acc, l_i, m_i, q, k, v, scale, None, IEEE)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_seqs", "num_tiles"])
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_info_ptr,
    tiles_ptr,
    out_ptr,
    scale,
    k_scale,
    v_scale,
    stride_q_tok,
    stride_q_head,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_bt_seq,
    stride_o_tok,
    stride_o_head,
    num_seqs,
    num_tiles,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    """One program: BLOCK_Q consecutive query tokens of one prefill chunk, with all query heads of one KV head
    (GQA: BLOCK_Q × GROUP_PAD rows share each K/V load). The chunk's queries sit at the end of its context
    (earlier tokens are prefix-cached or earlier chunks, already in the cache, and this chunk's K/V were
    written before the call): query j of a chunk of q_len in a context of ctx tokens is at position
    ctx - q_len + j and sees keys 0 … that position."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)
    first = tl.load(tiles_ptr + num_tiles + tile)  # the tile's first query, within its chunk
    q_start = tl.load(seq_info_ptr + seq)
    q_len = tl.load(seq_info_ptr + num_seqs + seq)
    ctx = tl.load(seq_info_ptr + 2 * num_seqs + seq)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = first + rows // GROUP_PAD  # each row: a query token within the chunk, and one head of the group
    head = kv_head * GROUP + rows % GROUP_PAD
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = ctx - q_len + tok
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    table_ptr = block_tables_ptr + seq * stride_bt_seq
    kv_offset = kv_head * stride_c_head
    # whole key blocks before the tile's first query are seen by every query: no mask; then the diagonal,
    # up to the tile's last query (every query sees key 0, so no row's max stays -inf: no NaN)
    unmasked = (ctx - q_len + first) // BLOCK_N * BLOCK_N
    hi = tl.minimum(ctx, ctx - q_len + first + BLOCK_Q)
    acc, l_i, m_i = _prefill_blocks(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_cache_ptr,
        v_cache_ptr,
        table_ptr,
        kv_offset,
        offs_d,
        scale,
        (k_scale, v_scale),
        0,
        unmasked,
        stride_c_block,
        stride_c_tok,
        BLOCK_SIZE,
        BLOCK_N,
        False,
        IEEE,
        FP8,
    )
    acc, l_i, m_i = _prefill_blocks(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_cache_ptr,
        v_cache_ptr,
        table_ptr,
        kv_offset,
        offs_d,
        scale,
        (k_scale, v_scale),
        unmasked,
        hi,
        stride_c_block,
        stride_c_tok,
        BLOCK_SIZE,
        BLOCK_N,
        True,
        IEEE,
        FP8,
    )
    tl.store(
        out_ptr + (q_start + tok)[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :],
        (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def prefill_block_q(dtype: torch.dtype, group: int, block_m: int | None = None) -> int:
    """Query tokens per prefill tile: a tile's block_m rows are its tokens × the GQA group (padded to a power
    of two). By default 64 rows (fp32: 32 — its tiles are twice the bytes; keep them in shared memory)."""
    rows = block_m or (32 if dtype == torch.float32 else 64)
    return max(rows // triton.next_power_of_2(group), 1)


def prefill_tiles(query_lens: list[int], context_lens: list[int], block_q: int) -> tuple[list[int], list[int]]:
    """Host metadata of one batch's prefill chunks, as two flat lists for one device copy each:
    seq_info = query starts (in the packed queries), query lengths, context lengths; tiles = each program's
    chunk index, then its first query within the chunk (tiles of block_q queries)."""
    starts, start, tile_seqs, tile_firsts = [], 0, [], []
    for i, n in enumerate(query_lens):
        starts.append(start)
        start += n
        for first in reversed(range(0, n, block_q)):  # the longest (latest) tiles first: a shorter tail
            tile_seqs.append(i)
            tile_firsts.append(first)
    return starts + list(query_lens) + list(context_lens), tile_seqs + tile_firsts


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_info: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
    **launch,
) -> torch.Tensor:
    """Attention for a batch of prefill chunks in one launch. q: [packed query tokens, heads, head_dim];
    block_tables: [chunks, max_blocks]; seq_info, tiles: prefill_tiles(…, prefill_block_q(dtype, group,
    block_m)) on the device; an FP8 cache holds K / kv_scales[0], V / kv_scales[1]. block_m (rows per tile),
    block_n and `launch` (num_warps, num_stages) are tuning knobs for bench/kernels.py."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    num_seqs, num_tiles = block_tables.shape[0], tiles.shape[0] // 2
    block_q = prefill_block_q(q.dtype, group, block_m)
    out = torch.empty_like(q) if out is None else out
    _paged_prefill_kernel[(num_tiles, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_info,
        tiles,
        out,
        scale,
        *kv_scales,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        num_seqs,
        num_tiles,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=block_n or (32 if q.dtype == torch.float32 else 64),
        IEEE=q.dtype == torch.float32,
        FP8=k_cache.dtype in FP8_DTYPES,
        **launch,
    )
    return out
