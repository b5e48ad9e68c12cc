"""Microbenchmarks of the CUDA path's Triton kernels (issue 6), to tune them and to see what each buys:

- paged decode attention: achieved bandwidth (KV bytes read / time) against the device copy bandwidth, over a
  sweep of launch configurations (KV tokens per loop iteration, warps, pipeline stages);
- paged prefill attention: TFLOP/s over a sweep of tile sizes, against the torch path (SDPA per chunk);
- the fused elementwise kernels and the fused sampler against the torch ops they replace;
- FP8 (W8A8) matmuls against bf16 ones at the shape's projection sizes (`--parts fp8-gemm`): time per call,
  TFLOP/s and weight-read bandwidth, the activation quantization included.

    python bench/kernels.py [--shape llama-3.2-1b]           # on a GPU: Qwen3-0.6B's shapes (default), bf16
    TRITON_INTERPRET=1 python bench/kernels.py --smoke       # the code paths on a CPU (tiny shapes, 1 run)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kubellm.runtime.model import attention as A  # noqa: E402
from kubellm.runtime.model import triton_attention as T  # noqa: E402
from kubellm.runtime.model import triton_ops  # noqa: E402


def timed(fn, reps: int) -> float:
    """Seconds per call (CUDA events on a GPU, after a warm-up call that also compiles)."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3 / reps


def paged_cache(context_lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype, device):
    """Random K/V caches holding these contexts in shuffled blocks, and their block tables."""
    counts = [(n + block_size - 1) // block_size for n in context_lens]
    total = sum(counts)
    k = torch.randn(total + 1, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    perm = torch.randperm(total).tolist()
    tables, used = [], 0
    for n in counts:
        tables.append(perm[used : used + n] + [total] * (max(counts) - n))
        used += n
    return k, v, torch.tensor(tables, device=device)


def bench_decode(shape, cases, configs, reps, bandwidth, device) -> None:
    print("\n## paged decode attention (one layer)")
    print("| seqs x context | tokens/iter | warps | stages | µs | GB/s | of copy bw |")
    print("|---|---|---|---|---|---|---|")
    for seqs, ctx, bound in cases:
        lens = [ctx] * seqs
        k, v, tables = paged_cache(lens, shape.kv_heads, shape.head_dim, shape.block_size, shape.dtype, device)
        q = torch.randn(seqs, shape.heads, shape.head_dim, dtype=shape.dtype, device=device)
        cl = torch.tensor(lens, device=device)
        nbytes = 2 * sum(lens) * shape.kv_heads * shape.head_dim * k.element_size()
        results = []
        for tokens, warps, stages in configs:
            try:
                s = timed(
                    lambda: T.paged_decode_attention(
                        q, k, v, tables, cl, shape.scale, bound, launch=(tokens, warps, stages)
                    ),
                    reps,
                )
            except Exception as e:  # a configuration that does not fit (shared memory, registers)
                print(f"| {seqs} x {ctx} | {tokens} | {warps} | {stages} | failed: {type(e).__name__} | | |")
                continue
            results.append((s, tokens, warps, stages))
        results.sort()
        default = T.decode_launch(shape.head_dim)
        shown = results[:5] + [r for r in results[5:] if r[1:] == default]
        for s, tokens, warps, stages in shown:
            mark = " (default)" if (tokens, warps, stages) == default else ""
            print(
                f"| {seqs} x {ctx} (bound {bound}) | {tokens}{mark} | {warps} | {stages} | {s * 1e6:.1f} | "
                f"{nbytes / s / 1e9:.0f} | {nbytes / s / bandwidth:.0%} |"
            )


def bench_prefill(shape, cases, configs, reps, device) -> None:
    print("\n## paged prefill attention (one layer)")
    print(
        "| chunks | block_m (rows: queries x GQA group) | block_n | warps | stages | ms | TFLOP/s | "
        "torch path (SDPA per chunk) ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, query_lens, context_lens in cases:
        k, v, tables = paged_cache(context_lens, shape.kv_heads, shape.head_dim, shape.block_size, shape.dtype, device)
        q = torch.randn(sum(query_lens), shape.heads, shape.head_dim, dtype=shape.dtype, device=device)
        # causal: query j of a chunk sees ctx - qlen + j + 1 keys
        pairs = sum(qn * (c - qn) + qn * (qn + 1) // 2 for qn, c in zip(query_lens, context_lens))
        flops = 4 * pairs * shape.heads * shape.head_dim
        A.set_context(
            A.AttentionMetadata(None, tables, torch.tensor(context_lens, device=device), query_lens, context_lens, 0)
        )
        torch_s = timed(lambda: A.paged_attention(q, k, v, shape.scale), reps)  # kernels.use_triton() is off here
        A.set_context(None)
        results = []
        for block_m, block_n, warps, stages in configs:
            block_q = T.prefill_block_q(shape.dtype, shape.heads // shape.kv_heads, block_m)
            info, tiles = T.prefill_tiles(query_lens, context_lens, block_q)
            info, tiles = torch.tensor(info, device=device), torch.tensor(tiles, device=device)
            try:
                s = timed(
                    lambda: T.paged_prefill_attention(
                        q,
                        k,
                        v,
                        tables,
                        info,
                        tiles,
                        shape.scale,
                        block_m=block_m,
                        block_n=block_n,
                        num_warps=warps,
                        num_stages=stages,
                    ),
                    reps,
                )
            except Exception as e:
                print(f"| {name} | {block_m} | {block_n} | {warps} | {stages} | failed: {type(e).__name__} | | |")
                continue
            results.append((s, block_m, block_n, warps, stages))
        results.sort()
        for s, block_m, block_n, warps, stages in results[:5]:
            print(
                f"| {name} | {block_m} | {block_n} | {warps} | {stages} | {s * 1e3:.3f} | {flops / s / 1e12:.1f} | "
                f"{torch_s * 1e3:.3f} |"
            )


def bench_fused(shape, rows_list, reps, device) -> None:
    from kubellm.runtime.model.layers import RMSNorm, RotaryEmbedding

    print("\n## fused elementwise kernels against the torch ops they replace (µs per call)")
    print("| rows | op | torch | Triton |")
    print("|---|---|---|---|")
    dt = shape.dtype
    norm = RMSNorm(shape.hidden, 1e-6).to(device=device, dtype=dt)
    head_norm = RMSNorm(shape.head_dim, 1e-6).to(device=device, dtype=dt)
    rotary = RotaryEmbedding(
        SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), shape.head_dim, 4096
    ).to(device)
    q_size, kv_size = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    for rows in rows_list:
        x = torch.randn(rows, shape.hidden, dtype=dt, device=device)
        res = torch.randn_like(x)
        gate_up = torch.randn(rows, 2 * shape.intermediate, dtype=dt, device=device)
        qkv = torch.randn(rows, q_size + 2 * kv_size, dtype=dt, device=device)
        positions = torch.randint(0, 4096, (rows,), device=device)
        k_cache = torch.zeros(
            rows // shape.block_size + 1, shape.block_size, shape.kv_heads, shape.head_dim, dtype=dt, device=device
        )
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(rows, device=device)

        def torch_qkv():
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q, k = head_norm(q.view(rows, -1, shape.head_dim)), head_norm(k.view(rows, -1, shape.head_dim))
            q, k = rotary(positions, q, k)
            A.write_kv(k, v.view(rows, -1, shape.head_dim), k_cache, v_cache, slots)

        def torch_silu():
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up

        ops = [
            ("RMSNorm + residual add", lambda: norm(x, res), lambda: triton_ops.rms_norm(x, norm.weight, 1e-6, res)),
            (
                "q/k norm + RoPE + KV write",
                torch_qkv,
                lambda: triton_ops.qkv_rope_write(
                    qkv,
                    positions,
                    rotary.cos,
                    rotary.sin,
                    head_norm.weight,
                    head_norm.weight,
                    1e-6,
                    k_cache,
                    v_cache,
                    slots,
                    shape.heads,
                    shape.kv_heads,
                    shape.head_dim,
                ),
            ),
            ("SiLU and mul", torch_silu, lambda: triton_ops.silu_and_mul(gate_up)),
        ]
        for name, torch_fn, triton_fn in ops:
            print(f"| {rows} | {name} | {timed(torch_fn, reps) * 1e6:.1f} | {timed(triton_fn, reps) * 1e6:.1f} |")
    rows = rows_list[0]  # sampling: a decode batch, temperature 0.6 (the offline benchmark's)
    from kubellm.runtime import SamplingParams
    from kubellm.runtime.engine.sampler import Sampler

    sampler = Sampler(device, 0)
    seqs = [SimpleNamespace(params=SamplingParams(temperature=0.6), index=0) for _ in range(rows)]
    logits = torch.randn(rows, shape.vocab, device=device, dtype=shape.dtype)  # the LM head's output
    temps = torch.full((rows,), 0.6, device=device)
    torch_s = timed(lambda: sampler._sample_torch(logits.float(), seqs), reps)  # the torch path widens first
    print(
        f"| {rows} | sampling, vocab {shape.vocab} | {torch_s * 1e6:.1f}"
        f" | {timed(lambda: triton_ops.sample(logits, temps, 7), reps) * 1e6:.1f} |"
    )


def bench_fp8_gemm(shape, rows_list: list[int], reps: int, device) -> None:
    """Each projection of a decoder layer as bf16 F.linear and as fp8.scaled_linear (per-token activation
    quantization + torch._scaled_mm): at decode sizes the weights' bytes set the time, at prefill sizes the
    tensor cores."""
    from kubellm.runtime.model import fp8

    q_out = shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim
    projections = [
        ("qkv", shape.hidden, q_out),
        ("o", shape.heads * shape.head_dim, shape.hidden),
        ("gate_up", shape.hidden, 2 * shape.intermediate),
        ("down", shape.intermediate, shape.hidden),
    ]
    print("\n| rows | projection | bf16 µs | fp8 µs | speed-up | fp8 TFLOP/s | fp8 weight GB/s |")
    print("|---|---|---|---|---|---|---|")
    for rows in rows_list:
        for name, k, n in projections:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            q, scale = fp8.quantize_per_channel(w)
            scale = scale.reshape(1, -1).contiguous()
            bf16_s = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), reps)
            fp8_s = timed(lambda x=x, q=q, scale=scale: fp8.scaled_linear(x, q, scale, None), reps)
            print(
                f"| {rows} | {name} {k}→{n} | {bf16_s * 1e6:.1f} | {fp8_s * 1e6:.1f} | {bf16_s / fp8_s:.2f}x | "
                f"{2 * rows * k * n / fp8_s / 1e12:.1f} | {n * k / fp8_s / 1e9:.0f} |"
            )


def kernel_shape(name: str) -> SimpleNamespace:
    """The attention and MLP sizes of a benchmark model (bench/shapes.py), bf16, 16-token KV blocks."""
    from bench.shapes import SHAPES

    c = SHAPES[name]
    return SimpleNamespace(
        heads=c["num_attention_heads"],
        kv_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        block_size=16,
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        vocab=c["vocab_size"],
        dtype=torch.bfloat16,
        scale=c["head_dim"] ** -0.5,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one configuration, one run: checks the code")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--parts", nargs="*", default=["decode", "prefill", "fused"])
    ap.add_argument("--shape", choices=["qwen3-0.6b", "llama-3.2-1b", "llama-3.1-8b"], default="qwen3-0.6b")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.smoke:
        shape = SimpleNamespace(
            heads=4,
            kv_heads=2,
            head_dim=32,
            block_size=16,
            hidden=64,
            intermediate=128,
            vocab=500,
            dtype=torch.float16,
            scale=32**-0.5,
        )
        decode_cases, decode_configs = [(4, 100, 100), (2, 300, 1024)], [(32, 4, 2)]
        prefill_cases = [("2 x 40", [40, 40], [40, 90])]
        prefill_configs, rows_list, reps = [(32, 32, 4, 2)], [16], 1
    else:
        shape = kernel_shape(args.shape)
        # (seqs, context, bound): bound is what the graphs pass (max_model_len), sizing the long-context split
        decode_cases = [(256, 1024, 4096), (256, 512, 4096), (64, 1024, 4096), (8, 8192, 9216)]
        decode_configs = list(itertools.product([32, 64, 128], [2, 4, 8], [1, 2, 3, 4]))
        prefill_cases = [
            ("8 x 1024", [1024] * 8, [1024] * 8),
            ("2 x 1024 after 3072 cached", [1024] * 2, [4096] * 2),
            ("1 x 8192", [8192], [8192]),
        ]
        prefill_configs = list(itertools.product([32, 64, 128], [32, 64], [4, 8], [1, 2, 3]))
        rows_list, reps = [256, 8192], args.reps
    from bench.hf_baselines import copy_bandwidth

    bandwidth = copy_bandwidth() if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# {name}, {shape.dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    if "decode" in args.parts:
        bench_decode(shape, decode_cases, decode_configs, reps, bandwidth, device)
    if "prefill" in args.parts:
        bench_prefill(shape, prefill_cases, prefill_configs, reps, device)
    if "fused" in args.parts:
        bench_fused(shape, rows_list, reps, device)
    if "fp8-gemm" in args.parts:
        bench_fp8_gemm(shape, [1, 64, 256, 8192] if not args.smoke else [4], reps, device)


if __name__ == "__main__":
    main()
