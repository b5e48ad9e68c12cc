"""Paged attention: the per-step metadata (a module-global context, so the model's forward takes only
tensors), the exact torch implementation (the CPU path) and the dispatch to the Triton decode and prefill
kernels (the CUDA path, see kernels.py).

A batch holds decode tokens first (one per sequence), then prefill chunks. Every layer writes the whole
batch's K/V into the cache before any sequence reads it.

An FP8 cache (--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2) holds K / k_scale and V / v_scale (per layer),
rounded to nearest even and saturated at the format's largest value (quantize_kv); every read turns the
values back into the compute dtype, times the scale (dequantize_kv), before any product. The Triton kernels
do the same arithmetic, so both paths see the same keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.bias import causal_lower_right

from kubellm.runtime.model.kernels import use_triton

DENSE_MASK_LIMIT = 1 << 20  # query × key elements up to which a prefill chunk uses an explicit mask
FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for a --kv-cache-dtype value (settings.KV_CACHE_DTYPES)."""
    return model_dtype if name == "auto" else FP8_KV_DTYPES[name]


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in FP8: x (fp32) times the fp32 reciprocal of the scale, saturated, rounded to nearest even."""
    limit = torch.finfo(dtype).max
    return (x.float() * (1.0 / scale)).clamp_(-limit, limit).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """FP8 cache values back in the compute dtype: fp32 value times the scale, then rounded to dtype."""
    return (x.float() * scale).to(dtype)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] flat cache slot of each new token
    block_tables: torch.Tensor  # [seqs, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [seqs] tokens in the cache after this step, per sequence
    query_lens: list[int]  # new tokens per sequence (1 for decodes)
    context_lens_list: list[int]
    num_decodes: int  # the first num_decodes sequences are single-token decodes
    max_decode_context: int | None = None  # bound on decode contexts; None: read it from context_lens_list
    prefill_tiles: tuple[torch.Tensor, torch.Tensor] | None = None  # the Triton prefill kernel's work list


_CONTEXT: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    global _CONTEXT
    _CONTEXT = meta


def get_context() -> AttentionMetadata:
    assert _CONTEXT is not None, "attention called outside a runner step"
    return _CONTEXT


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    # caches: [blocks, block_size, kv_heads, head_dim]; k, v: [tokens, kv_heads, head_dim]
    if is_fp8(k_cache):  # index_copy_ has no FP8 kernels: the bytes are copied
        k = quantize_kv(k, k_scale, k_cache.dtype).view(torch.uint8)
        v = quantize_kv(v, v_scale, v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def _gather(
    cache: torch.Tensor, block_tables: torch.Tensor, length: int, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """[seqs, blocks] table → [seqs, length, kv_heads, head_dim] keys or values, in dtype."""
    num_blocks = (length + cache.shape[1] - 1) // cache.shape[1]
    x = cache[block_tables[:, :num_blocks]].flatten(1, 2)[:, :length]
    return dequantize_kv(x, scale, dtype) if is_fp8(cache) else x


def _triton_paged_attention(
    meta: AttentionMetadata,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    kv_scales: tuple[float, float],
) -> torch.Tensor:
    """The CUDA path: one kernel for the decodes, one for all prefill chunks, each writing its rows of out."""
    from kubellm.runtime.model import triton_attention as T
    from kubellm.runtime.model.kernels import to_device

    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        bound = meta.max_decode_context or max(meta.context_lens_list[:nd])
        T.paged_decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.block_tables[:nd],
            meta.context_lens[:nd],
            scale,
            bound,
            out=out[:nd],
            kv_scales=kv_scales,
        )
    if len(meta.query_lens) > nd:
        if meta.prefill_tiles is None:  # built by the first layer, reused by the others
            seq_info, tiles = T.prefill_tiles(
                meta.query_lens[nd:],
                meta.context_lens_list[nd:],
                T.prefill_block_q(q.dtype, q.shape[1] // k_cache.shape[2]),
            )
            meta.prefill_tiles = to_device(seq_info, q.device), to_device(tiles, q.device)
        T.paged_prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            meta.block_tables[nd:],
            *meta.prefill_tiles,
            scale,
            out=out[nd:],
            kv_scales=kv_scales,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q: [tokens, heads, head_dim] → [tokens, heads, head_dim], reading K/V from the paged cache (an FP8
    cache's values times k_scale / v_scale)."""
    meta = get_context()
    if use_triton():
        return _triton_paged_attention(meta, q, k_cache, v_cache, scale, (k_scale, v_scale))
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q)

    nd = meta.num_decodes
    if nd:
        max_len = max(meta.context_lens_list[:nd])
        keys = _gather(k_cache, meta.block_tables[:nd], max_len, k_scale, q.dtype)  # [nd, L, kvh, d]
        values = _gather(v_cache, meta.block_tables[:nd], max_len, v_scale, q.dtype)
        qd = q[:nd].view(nd, kv_heads, group, head_dim)
        scores = torch.einsum("bkgd,blkd->bkgl", qd, keys) * scale
        pad = torch.arange(max_len, device=q.device)[None, :] >= meta.context_lens[:nd, None]
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out[:nd] = torch.einsum("bkgl,blkd->bkgd", probs, values).reshape(nd, heads, head_dim)

    start = nd
    for i in range(nd, len(meta.query_lens)):
        qlen, ctx = meta.query_lens[i], meta.context_lens_list[i]
        keys = _gather(k_cache, meta.block_tables[i : i + 1], ctx, k_scale, q.dtype)[0]  # [ctx, kvh, d]
        values = _gather(v_cache, meta.block_tables[i : i + 1], ctx, v_scale, q.dtype)[0]
        # 4-D [1, heads, len, d]: SDPA's fused kernels (and CausalBias dispatch) need a batch dimension
        qi = q[start : start + qlen].transpose(0, 1)[None]
        ki = keys.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        vi = values.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        # query j sits at position ctx - qlen + j and may see keys 0 … that position (bottom-right causal).
        # Measured on an H100 (bench/RESULTS.md): a small chunk is fastest with a dense mask; a large one
        # must not materialize it (8k × 8k) and goes to the fused kernels through is_causal / a CausalBias.
        if qlen * ctx <= DENSE_MASK_LIMIT:
            mask = torch.ones(qlen, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - qlen)
            o = torch.nn.functional.scaled_dot_product_attention(qi[0], ki[0], vi[0], attn_mask=mask, scale=scale)[None]
        elif qlen == ctx:
            o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=causal_lower_right(qlen, ctx), scale=scale
            )
        out[start : start + qlen] = o[0].transpose(0, 1)
        start += qlen
    return out
