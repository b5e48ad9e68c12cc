"""Compile every Triton kernel launch the engine makes to cubins for sm_90 (H100) and sm_80 (A100), with
Triton's compiler and ptxas — no GPU needed — and check each fits the GPU's shared memory. The interpreter
(which the other kernel tests use without a GPU) accepts code the GPU compiler rejects; this does not.

    python -m tests.support.triton_compile_check
    # against another triton (the H100 image has 3.6):
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python -m tests.support.triton_compile_check
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
POINTER_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
}
TARGETS = ((90, 227 * 1024), (80, 163 * 1024))  # (compute capability, shared memory per block): H100, A100


def type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    assert isinstance(value, float), value
    return "fp32"


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """What the JIT would compile for this launch, for `target` instead of the local device."""
    bound = {**dict(zip(fn.arg_names, args)), **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}}
    signature = {p.name: "constexpr" if p.is_constexpr else type_of(bound[p.name]) for p in fn.params}
    constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr}
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    return triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)


def model_launches(dtype, heads: int, kv_heads: int, head_dim: int, hidden: int, inter: int, vocab: int) -> None:
    """Call every kernel wrapper once the way the engine does for a model of this shape (a step with decodes,
    long-context decodes, a prefill chunk, both norms, the MLP, both rope variants, sampling)."""
    from kubellm.runtime.model import triton_attention as TA
    from kubellm.runtime.model import triton_ops as TO

    tokens = 8
    cache = torch.zeros(32, 16, kv_heads, head_dim, dtype=dtype)
    q = torch.zeros(4, heads, head_dim, dtype=dtype)
    tables, lens = torch.zeros(4, 8, dtype=torch.long), torch.ones(4, dtype=torch.long)
    TA.paged_decode_attention(q, cache, cache, tables, lens, 0.1, 100)  # one partition
    TA.paged_decode_attention(q, cache, cache, tables, lens, 0.1, 40960)  # split, and the merge kernel
    info, tiles = TA.prefill_tiles([tokens], [tokens], TA.prefill_block_q(dtype, heads // kv_heads))
    TA.paged_prefill_attention(
        torch.zeros(tokens, heads, head_dim, dtype=dtype),
        cache,
        cache,
        tables[:1],
        torch.tensor(info),
        torch.tensor(tiles),
        0.1,
    )
    x, w = torch.zeros(tokens, hidden, dtype=dtype), torch.zeros(hidden, dtype=dtype)
    TO.rms_norm(x, w, 1e-6)
    TO.rms_norm(x, w, 1e-6, x.clone())
    TO.silu_and_mul(torch.zeros(tokens, 2 * inter, dtype=dtype))
    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    rope, positions = torch.zeros(64, head_dim), torch.zeros(tokens, dtype=torch.long)
    for qk_norm in (None, torch.zeros(head_dim, dtype=dtype)):
        TO.qkv_rope_write(
            qkv, positions, rope, rope, qk_norm, qk_norm, 1e-6, cache, cache, positions, heads, kv_heads, head_dim
        )
    TO.sample(torch.zeros(4, vocab, dtype=dtype), torch.zeros(4), 12345)  # the LM head's output, as it is


def moe_launches(dtype, tokens: int, experts: int, top_k: int, hidden: int, inter: int) -> None:
    """The fused MoE layer's launches (both grouped GEMMs) for a batch of this many tokens."""
    from kubellm.runtime.model import triton_moe as TM

    ids = torch.zeros(tokens, top_k, dtype=torch.long)
    TM.fused_moe(
        torch.zeros(tokens, hidden, dtype=dtype),
        torch.zeros(experts, 2 * inter, hidden, dtype=dtype),
        torch.zeros(experts, hidden, inter, dtype=dtype),
        torch.zeros(tokens, top_k),
        ids,
    )


def main() -> None:
    launches = []
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    model_launches(torch.bfloat16, 16, 8, 128, 1024, 3072, 151936)  # Qwen3-0.6B
    model_launches(torch.bfloat16, 32, 8, 64, 2048, 8192, 128256)  # Llama-3.2-1B
    model_launches(torch.float16, 14, 2, 64, 896, 4864, 151936)  # Qwen2-0.5B's shape: a GQA group of 7
    model_launches(torch.float32, 4, 2, 32, 64, 128, 500)  # the fp32 exactness tests' tiny models
    model_launches(torch.float32, 16, 8, 128, 1024, 3072, 151936)  # fp32 at a real head size (IEEE dots)
    for tokens in (4, 512):  # decode-sized (16-row tiles) and prefill-sized (64-row tiles)
        moe_launches(torch.bfloat16, tokens, 128, 8, 2048, 768)  # Qwen3-30B-A3B
        moe_launches(torch.float32, tokens, 8, 2, 64, 32)  # the tiny Qwen3-MoE of the exactness tests
    for capability, shared_limit in TARGETS:
        for fn, args, kwargs in launches:
            kernel = compile_launch(fn, args, kwargs, GPUTarget("cuda", capability, 32))
            assert kernel.metadata.shared <= shared_limit, (fn.__name__, capability, kernel.metadata.shared)
    print(f"triton {triton.__version__}: {len(launches)} launches compiled for sm_90 and sm_80")
    print("ok")


if __name__ == "__main__":
    main()
