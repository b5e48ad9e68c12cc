"""Fused Triton kernels for the elementwise parts of a decoder layer, and for sampling, on the CUDA path.

Unfused, each of these is several kernels (casts, a reduction, multiplies, a concat, an index_copy); under
CUDA graphs a decode step is ~30 such small kernels per layer, microseconds each, while the step's floor is
a few milliseconds of weight and KV reads. Fused, each is one kernel reading its input once:

- rms_norm: RMSNorm, optionally with the residual add before it (the residual is returned updated);
- silu_and_mul: SiLU(gate) * up over the packed gate/up projection;
- qkv_rope_write: splits the packed q/k/v projection, applies Qwen3's per-head q/k RMSNorm when present and
  the rotary embedding, writes K and V into the paged cache at their slots and returns Q;
- sample: one token per row of logits, greedy or by temperature, in one pass (Gumbel-max).

Each rounds to the model's dtype where HF's torch code does (the residual sum, the normalized activations
before the weight, each product of the rotary embedding), and the norm and rotary kernels are compiled
without FMA contraction (HF runs them as separate torch ops), so results differ from the torch path's only
where a sum's order moves the last bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)  # HF adds in the dtype
        tl.store(res_out_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)  # as HF: torch.rsqrt
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [..., hidden], normalized over the last dimension. Returns (normalized, the updated residual
    x + residual — written in place into `residual` — or None when no residual was given)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty_like(rows)
    res = residual.view(-1, n) if residual is not None else rows
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows,
        res,
        weight,
        out,
        res,
        rows.stride(0),
        res.stride(0),
        out.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
        enable_fp_fusion=False,
    )
    return out.view(x.shape), residual


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * stride_in + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [rows, 2 * n] (gate, then up) → [rows, n]."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out


# FP8 formats of a KV cache: (mantissa bits, exponent bias, largest finite value)
FP8_FORMATS = {torch.float8_e4m3fn: (3, 7, 448.0), torch.float8_e5m2: (2, 15, 57344.0)}


@triton.jit
def _fp8_bits(x, MANTISSA: tl.constexpr, BIAS: tl.constexpr, LIMIT: tl.constexpr, SUBNORMAL_UNITS: tl.constexpr):
    """fp32 → the byte of its FP8 value, saturated at ±LIMIT and rounded to nearest even, subnormals included:
    what torch's .to(float8) gives. Written out in integer arithmetic because Triton's interpreter rounds
    its own fp8 cast differently (ties up, mantissa carries lost), so the CPU tests could not check it."""
    x = tl.minimum(tl.maximum(x, -LIMIT), LIMIT)
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    shift: tl.constexpr = 23 - MANTISSA
    # normal: drop the low mantissa bits, rounding half to even (a carry moves into the exponent), rebias
    normal = ((a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift) - ((127 - BIAS) << MANTISSA)
    # below the smallest normal 2^(1 - BIAS): a count of the smallest subnormal, rounded half to even by the
    # fp32 addition of 2^23 (a count of 2^MANTISSA is the smallest normal's code, as it should be)
    units = tl.abs(x) * SUBNORMAL_UNITS
    sub = ((units + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < ((128 - BIAS) << 23), sub, normal)
    return (sign | code).to(tl.uint8)


@triton.jit
def _kv_store(dst, y, inv_scale, FP8: tl.constexpr, FMT: tl.constexpr):
    """Store K or V values into the cache: as they are, or (an FP8 cache, given as bytes) y / scale in FP8."""
    if FP8:
        tl.store(dst, _fp8_bits(y.to(tl.float32) * inv_scale, FMT[0], FMT[1], FMT[2], FMT[3]))
    else:
        tl.store(dst, y)


@triton.jit
def _qkv_rope_write_kernel(
    qkv_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    slots_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    eps,
    inv_k_scale,
    inv_v_scale,
    stride_qkv,
    stride_q_tok,
    stride_q_head,
    stride_c_slot,
    stride_c_head,
    stride_rope,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    QK_NORM: tl.constexpr,
    FP8: tl.constexpr,
    FMT: tl.constexpr,
):
    """One program: one token, one head of q (head < NUM_HEADS) or one KV head (then its V too)."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty  # x.to(dtype).to(tl.float32): rounded where HF keeps a value in the dtype
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, half)
    is_q = head < NUM_HEADS
    src = qkv_ptr + tok * stride_qkv + head * HEAD_DIM  # q heads, then k heads, then v heads
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + half + offs).to(tl.float32)
    if QK_NORM:  # Qwen3: RMSNorm over each head before the rotation
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / HEAD_DIM + eps)
        w1 = tl.where(is_q, tl.load(q_norm_ptr + offs), tl.load(k_norm_ptr + offs)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(q_norm_ptr + half + offs), tl.load(k_norm_ptr + half + offs)).to(tl.float32)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(positions_ptr + tok)
    cos = tl.load(cos_ptr + pos * stride_rope + offs).to(dtype).to(tl.float32)  # the table's halves are equal
    sin = tl.load(sin_ptr + pos * stride_rope + offs).to(dtype).to(tl.float32)
    # HF: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1)
    y1 = ((x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    y2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if is_q:
        dst = q_out_ptr + tok * stride_q_tok + head * stride_q_head
        tl.store(dst + offs, y1)
        tl.store(dst + half + offs, y2)
    else:
        kv_head = head - NUM_HEADS
        slot = tl.load(slots_ptr + tok)
        k_dst = k_cache_ptr + slot * stride_c_slot + kv_head * stride_c_head
        _kv_store(k_dst + offs, y1, inv_k_scale, FP8, FMT)
        _kv_store(k_dst + half + offs, y2, inv_k_scale, FP8, FMT)
        v_src = qkv_ptr + tok * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        v_dst = v_cache_ptr + slot * stride_c_slot + kv_head * stride_c_head
        _kv_store(v_dst + offs, tl.load(v_src + offs), inv_v_scale, FP8, FMT)
        _kv_store(v_dst + half + offs, tl.load(v_src + half + offs), inv_v_scale, FP8, FMT)


def qkv_rope_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """qkv: [tokens, (heads + 2 kv_heads) * head_dim]; cos/sin: [positions, head_dim] fp32; caches: [blocks,
    block_size, kv_heads, head_dim]. Writes rotated K and V at `slots` (an FP8 cache: K / kv_scales[0] and
    V / kv_scales[1], as attention.quantize_kv), returns rotated Q [tokens, heads, dim]."""
    tokens = qkv.shape[0]
    fmt = FP8_FORMATS.get(k_cache.dtype)
    if fmt is not None:  # the kernel writes the bytes
        mantissa, bias, _ = fmt
        fmt = (*fmt, 2.0 ** (bias - 1 + mantissa))
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    norm_w = q_norm if q_norm is not None else q  # unused when QK_NORM is off
    _qkv_rope_write_kernel[(tokens, num_heads + num_kv_heads)](
        qkv,
        positions,
        cos,
        sin,
        norm_w,
        k_norm if k_norm is not None else norm_w,
        slots,
        q,
        k_cache,
        v_cache,
        eps,
        1.0 / kv_scales[0],
        1.0 / kv_scales[1],
        qkv.stride(0),
        q.stride(0),
        q.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        cos.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        QK_NORM=q_norm is not None,
        FP8=fmt is not None,
        FMT=fmt or (0, 0, 0.0, 0.0),
        num_warps=1,  # a program handles one head: head_dim / 2 elements per vector
        enable_fp_fusion=False,  # x * cos + rot * sin rounded twice, as HF's separate torch ops (no FMA)
    )
    return q


SAMPLE_BLOCK = 1024  # vocabulary columns per loop iteration


# a new seed every call, and a part size that follows the batch size: neither is specialized on (no recompiles)
@triton.jit(do_not_specialize=["seed", "part_cols"])
def _sample_kernel(
    logits_ptr,
    stride,
    temps_ptr,
    part_best_ptr,
    part_idx_ptr,
    seed,
    vocab,
    part_cols,
    PARTS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (row, part of the vocabulary): the Gumbel-max trick, argmax(logits / T + Gumbel noise),
    is a draw from softmax(logits / T); T == 0 is the plain argmax. Writes the part's best value and its lowest
    index; the noise of a column depends only on (seed, row, column), so the split changes nothing."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    begin = part * part_cols
    end = tl.minimum(vocab, begin + part_cols)
    t = tl.load(temps_ptr + row)
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(begin, end, BLOCK):
        cols = start + offs
        x = tl.load(logits_ptr + row * stride + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        if t > 0:
            u = tl.rand(seed, row * vocab + cols)  # uniform [0, 1); u == 0 gives -inf, never picked
            x = x / t - tl.log(-tl.log(u))
        better = x > best
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, 0)
    tl.store(part_best_ptr + row * PARTS_PAD + part, top)
    tl.store(part_idx_ptr + row * PARTS_PAD + part, tl.min(tl.where(best == top, best_idx, vocab), 0))


@triton.jit
def _sample_merge_kernel(part_best_ptr, part_idx_ptr, out_ptr, parts, PARTS_PAD: tl.constexpr):
    """One program per row: the best of its parts; ties go to the lowest index, as torch.argmax."""
    row = tl.program_id(0)
    offs = tl.arange(0, PARTS_PAD)
    used = offs < parts
    best = tl.load(part_best_ptr + row * PARTS_PAD + offs, mask=used, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * PARTS_PAD + offs, mask=used, other=2**31 - 1)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(used & (best == top), idx, 2**31 - 1), 0).to(tl.int64))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sample_parts(rows: int, blocks: int, device: torch.device) -> int:
    """Parts per row: enough programs for ~4 per SM, at most one per block of columns."""
    if device.type != "cuda":
        return min(blocks, 3)  # Triton's interpreter: a few parts, so the CPU tests cover the split and merge
    return max(1, min(blocks, triton.cdiv(4 * _sm_count(device), rows)))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of logits [rows, vocab] (any float dtype), in one pass over them (the torch sampler
    makes ~6: scale, softmax, noise, divide, argmax twice). temperatures: [rows] fp32, 0 = greedy; seed: fresh
    per call. A small batch splits each row's vocabulary over several programs (one per row would leave most
    of the GPU idle at 256 rows and nearly all of it at one), merged by a second tiny kernel."""
    rows, vocab = logits.shape
    blocks = triton.cdiv(vocab, SAMPLE_BLOCK)
    parts = _sample_parts(rows, blocks, logits.device)
    part_cols = triton.cdiv(blocks, parts) * SAMPLE_BLOCK
    parts = triton.cdiv(vocab, part_cols)  # none empty
    pad = triton.next_power_of_2(blocks)  # by the vocabulary only: one compile per model
    part_best = torch.empty(rows, pad, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, pad, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    _sample_kernel[(rows, parts)](
        logits,
        logits.stride(0),
        temperatures,
        part_best,
        part_idx,
        seed,
        vocab,
        part_cols,
        PARTS_PAD=pad,
        BLOCK=SAMPLE_BLOCK,
    )
    _sample_merge_kernel[(rows,)](part_best, part_idx, out, parts, PARTS_PAD=pad)
    return out
