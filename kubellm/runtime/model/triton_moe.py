"""The fused mixture-of-experts layer of the CUDA path: every (token, chosen expert) pair computed by two grouped
GEMMs, one program per tile of pairs that share an expert, with no host sync (CUDA-graph capturable).

1. align_pairs sorts the tokens' [tokens·top_k] pairs by expert and pads each expert's run to a multiple of
   BLOCK_M (torch ops on the device, sized for the worst case so the shapes never depend on the routing);
2. _moe_gemm_kernel: for each tile, the rows of its pairs times its expert's w13 → [pairs, 2·I];
3. SiLU-and-mul (triton_ops.silu_and_mul) → [pairs, I];
4. _moe_gemm_kernel again with w2, each row scaled by its routing weight → [pairs, H];
5. each token's top_k rows summed.

fp32 products use IEEE dots (no TF32), so the fp32 model stays exact against HF up to the order of sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubellm.runtime.model.triton_ops import silu_and_mul


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_pairs_ptr,
    tile_expert_ptr,
    num_padded_ptr,
    n_cols,
    k_dim,
    num_pairs,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    TOP_K: tl.constexpr,
    ROW_PER_PAIR: tl.constexpr,
    MUL_WEIGHTS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's padded run: the grid is sized for the worst case
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + offs_m)
    valid = pair < num_pairs  # padding entries hold num_pairs
    row = pair if ROW_PER_PAIR else pair // TOP_K
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = offs_k < k_dim - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n < n_cols)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHTS:
        # HF rounds the expert's output to the model's dtype before weighting it
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < n_cols)[None, :])


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [tokens, top_k] → (sorted_pairs: pair indices (token·top_k + slot) grouped by expert, each group padded
    to a multiple of block_m with num_pairs; tile_expert: each tile's expert; num_padded: [1], the used length).
    Lengths are the worst case for this many pairs, so nothing depends on the routing's values."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(num_pairs, device=ids.device) - (counts.cumsum(0) - counts)[by_expert]
    length = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    length = triton.cdiv(length, block_m) * block_m
    sorted_pairs = torch.full((length,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[(ends - padded)[by_expert] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, length, block_m, device=ids.device)
    tile_expert = torch.searchsorted(ends, tile_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_pairs, tile_expert, ends[-1:]


def _blocks(num_pairs: int, num_experts: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small tiles when each expert sees few pairs (decode), larger for prefill."""
    block_m = 16 if num_pairs <= 4 * num_experts else 64
    block_k = 32 if dtype == torch.float32 else 64
    return block_m, 64, block_k


def _grouped_gemm(a, w, out, weights, sorted_pairs, tile_expert, num_padded, top_k, row_per_pair, blocks):
    block_m, block_n, block_k = blocks
    n_cols, k_dim = w.shape[1], w.shape[2]
    grid = (sorted_pairs.numel() // block_m, triton.cdiv(n_cols, block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        out if weights is None else weights,  # not read without MUL_WEIGHTS
        sorted_pairs,
        tile_expert,
        num_padded,
        n_cols,
        k_dim,
        out.shape[0],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        TOP_K=top_k,
        ROW_PER_PAIR=row_per_pair,
        MUL_WEIGHTS=weights is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x [tokens, H]; w13 [E, 2I, H]; w2 [E, H, I]; weights, ids [tokens, top_k] → [tokens, H]."""
    tokens, top_k = ids.shape
    num_experts, num_pairs = w13.shape[0], ids.numel()
    blocks = _blocks(num_pairs, num_experts, x.dtype)
    sorted_pairs, tile_expert, num_padded = align_pairs(ids, num_experts, blocks[0])
    x = x.contiguous()
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, None, sorted_pairs, tile_expert, num_padded, top_k, False, blocks)
    act = silu_and_mul(gate_up)
    down = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, down, weights.contiguous(), sorted_pairs, tile_expert, num_padded, top_k, True, blocks)
    return down.view(tokens, top_k, -1).sum(dim=1)
