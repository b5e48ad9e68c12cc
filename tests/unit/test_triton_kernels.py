"""The Triton kernels of the CUDA path equal the torch reference, and the whole model run through them
reproduces HF's greedy output. Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set
before triton is imported: hence a subprocess per script), natively when CUDA is present.

The interpreter's bf16 matrix product is broken (garbage; its fp32 → bf16 casts truncate), so bf16 dot
kernels are checked natively only; fp16 covers the half-precision code paths here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

DECODE = textwrap.dedent("""
    import torch
    from kubellm.runtime.model import attention as A
    from kubellm.runtime.model.triton_attention import paged_decode_attention
    from tests.support.paged import shuffled_block_tables

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype, heads, kv_heads, head_dim, bs in [(torch.float32, 4, 2, 16, 16), (torch.float32, 8, 1, 32, 8),
                                                 (torch.float32, 6, 6, 64, 16)]:
        blocks = 40
        kc = torch.randn(blocks, bs, kv_heads, head_dim, dtype=dtype, device=device)
        vc = torch.randn(blocks, bs, kv_heads, head_dim, dtype=dtype, device=device)
        lens = [1, 5, 16, 17, 70, 130]
        bt = shuffled_block_tables(lens, bs, blocks).to(device)
        cl = torch.tensor(lens, device=device)
        q = torch.randn(len(lens), heads, head_dim, dtype=dtype, device=device)
        A.set_context(A.AttentionMetadata(slot_mapping=None, block_tables=bt, context_lens=cl,
                                          query_lens=[1] * len(lens), context_lens_list=lens, num_decodes=len(lens)))
        ref = A.paged_attention(q.cpu(), kc.cpu(), vc.cpu(), 0.3) if device == "cpu" else None
        if ref is None:
            A.set_context(A.AttentionMetadata(None, bt.cpu(), cl.cpu(), [1] * len(lens), lens, len(lens)))
            ref = A.paged_attention(q.cpu(), kc.cpu(), vc.cpu(), 0.3)
        for part_tokens in (512, 32):  # one partition, and contexts split over up to 3 (a partial last one)
            got = paged_decode_attention(q, kc, vc, bt, cl, 0.3, max(lens), part_tokens).cpu()
            err = (got - ref).abs().max().item()
            assert err < 1e-4, (heads, kv_heads, head_dim, part_tokens, err)
        # under CUDA graphs the split is sized for the model's length, far past these contexts (capped partitions)
        got = paged_decode_attention(q, kc, vc, bt, cl, 0.3, 4096, 32).cpu()
        assert (got - ref).abs().max().item() < 1e-4
    print("ok")
""")


def run_script(script: str, *args: str, interpret: bool | None = None) -> None:
    """Run a script in a fresh interpreter; through Triton's interpreter unless CUDA is here (or told)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    if interpret if interpret is not None else not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_triton_decode_kernel_matches_torch_reference():
    run_script(DECODE)


PREFILL = textwrap.dedent("""
    import torch
    from kubellm.runtime.model import attention as A
    from kubellm.runtime.model.triton_attention import paged_prefill_attention, prefill_block_q, prefill_tiles
    from tests.support.paged import shuffled_block_tables

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # GQA groups of 2, 8 (a tile of 4 tokens), 1, and 3 (padded to 4 rows per token)
    cases = [(torch.float32, 4, 2, 16, 16), (torch.float32, 8, 1, 32, 8), (torch.float16, 6, 6, 64, 16),
             (torch.float32, 6, 2, 32, 16)]
    if device == "cuda":
        cases.append((torch.bfloat16, 16, 8, 128, 16))
    for dtype, heads, kv_heads, head_dim, bs in cases:
        blocks = 60
        kc = torch.randn(blocks, bs, kv_heads, head_dim, dtype=dtype)
        vc = torch.randn(blocks, bs, kv_heads, head_dim, dtype=dtype)
        # whole prompts (query = context), chunks after a prefix-cache hit or an earlier chunk, chunks of
        # several query tiles, and tiles that end mid-chunk
        query_lens = [2, 40, 70, 5, 33, 1]
        context_lens = [2, 40, 150, 37, 100, 9]
        bt = shuffled_block_tables(context_lens, bs, blocks)
        q = torch.randn(sum(query_lens), heads, head_dim, dtype=dtype)
        A.set_context(A.AttentionMetadata(None, bt, torch.tensor(context_lens), query_lens, context_lens, 0))
        ref = A.paged_attention(q.float(), kc.float(), vc.float(), 0.3)  # the CPU path, in fp32
        info, tiles = prefill_tiles(query_lens, context_lens, prefill_block_q(dtype, heads // kv_heads))
        dev = lambda t: t.to(device)
        got = paged_prefill_attention(dev(q), dev(kc), dev(vc), dev(bt), dev(torch.tensor(info)),
                                      dev(torch.tensor(tiles)), 0.3).float().cpu()
        err = (got - ref).abs().max().item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (dtype, heads, kv_heads, head_dim, err)
    print("ok")
""")


def test_triton_prefill_kernel_matches_torch_reference():
    run_script(PREFILL)


OPS = textwrap.dedent("""
    import itertools
    import torch
    from types import SimpleNamespace
    from kubellm.runtime.model import triton_ops
    from kubellm.runtime.model.attention import write_kv
    from kubellm.runtime.model.layers import RMSNorm, RotaryEmbedding

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = lambda t: t.to(device)

    def close(got, ref, dtype, what):
        # fp32: the order of a sum; half precision: a few roundings of 1 ulp (the interpreter truncates where
        # the GPU rounds to nearest, and a sum's order can move a value across a rounding boundary)
        tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        err = ((got.float().cpu() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
        assert err <= tol, (what, dtype, err)

    rope_config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        norm = RMSNorm(96, 1e-6).to(dtype)
        norm.weight.data = torch.randn(96).to(dtype)
        x, res = torch.randn(5, 96, dtype=dtype), torch.randn(5, 96, dtype=dtype)
        out, _ = triton_ops.rms_norm(dev(x), dev(norm.weight.data), 1e-6)
        close(out, norm(x), dtype, "rms_norm")
        ref_out, ref_res = norm(x, res)
        res_dev = dev(res)
        out, new_res = triton_ops.rms_norm(dev(x), dev(norm.weight.data), 1e-6, res_dev)
        assert new_res is res_dev  # updated in place
        close(out, ref_out, dtype, "rms_norm+residual")
        close(new_res, ref_res, dtype, "residual")

        gate_up = torch.randn(4, 2 * 1500, dtype=dtype)  # more than one 1024-column program per row
        gate, up = gate_up.chunk(2, dim=-1)
        close(triton_ops.silu_and_mul(dev(gate_up)), torch.nn.functional.silu(gate) * up, dtype, "silu_and_mul")

        bs, blocks, tokens = 8, 10, 7
        # a tiny shape, and Qwen3-0.6B's heads (16 query, 8 KV, head_dim 128)
        for (heads, kv_heads, head_dim), qk_norm in itertools.product([(4, 2, 32), (16, 8, 128)], (False, True)):
            rotary = RotaryEmbedding(rope_config, head_dim, 300)
            qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
            positions = torch.tensor([0, 5, 17, 100, 3, 299, 8])
            slots = torch.randperm(blocks * bs)[:tokens]
            q_norm, k_norm = RMSNorm(head_dim, 1e-6).to(dtype), RMSNorm(head_dim, 1e-6).to(dtype)
            q_norm.weight.data, k_norm.weight.data = torch.randn(head_dim).to(dtype), torch.randn(head_dim).to(dtype)
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q, k, v = q.view(-1, heads, head_dim), k.reshape(-1, kv_heads, head_dim), v.reshape(-1, kv_heads, head_dim)
            if qk_norm:
                q, k = q_norm(q), k_norm(k)
            q, k = rotary(positions, q, k)
            k_cache = torch.zeros(blocks, bs, kv_heads, head_dim, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            write_kv(k, v, k_cache, v_cache, slots)
            got_k, got_v = dev(torch.zeros_like(k_cache)), dev(torch.zeros_like(v_cache))
            got_q = triton_ops.qkv_rope_write(dev(qkv), dev(positions), dev(rotary.cos), dev(rotary.sin),
                                              dev(q_norm.weight.data) if qk_norm else None,
                                              dev(k_norm.weight.data) if qk_norm else None, 1e-6,
                                              got_k, got_v, dev(slots), heads, kv_heads, head_dim)
            close(got_q, q, dtype, "q")
            close(got_k, k_cache, dtype, "k cache")
            assert torch.equal(got_v.cpu(), v_cache), "v cache"
    print("ok")
""")


def test_triton_fused_ops_match_torch_layers():
    run_script(OPS)


FP8_KV = textwrap.dedent("""
    import torch
    from kubellm.runtime.model import attention as A, triton_ops
    from kubellm.runtime.model.triton_attention import (paged_decode_attention, paged_prefill_attention,
                                                        prefill_block_q, prefill_tiles)
    from tests.support.paged import shuffled_block_tables

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = lambda t: t.to(device)
    for fp8, dtype in [(torch.float8_e4m3fn, torch.float32), (torch.float8_e5m2, torch.float32),
                       (torch.float8_e4m3fn, torch.float16)]:
        heads, kv_heads, head_dim, bs, blocks = 8, 2, 32, 16, 60
        kv_scales = (0.25, 3.0)  # not powers of two: the rounding of x × (1 / scale) must match too
        # the fused write: K and V bytes equal write_kv's, values from subnormal to past the format's largest
        tokens = 40
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        qkv *= torch.logspace(-4, 3, qkv.shape[1]).to(dtype)[torch.randperm(qkv.shape[1])]
        positions, slots = torch.arange(tokens), torch.randperm(blocks * bs)[:tokens]
        cos = sin = torch.ones(tokens, head_dim)  # a rotation that keeps x1·cos - x2·sin: the scale sweep survives
        ref_k, ref_v = torch.zeros(blocks, bs, kv_heads, head_dim, dtype=fp8), torch.zeros(blocks, bs, kv_heads,
                                                                                          head_dim, dtype=fp8)
        got_k, got_v = dev(torch.zeros_like(ref_k)), dev(torch.zeros_like(ref_v))
        triton_ops.qkv_rope_write(dev(qkv), dev(positions), dev(cos), dev(sin), None, None, 0.0, got_k, got_v,
                                  dev(slots), heads, kv_heads, head_dim, kv_scales)
        k = torch.empty(tokens, kv_heads, head_dim, dtype=dtype)
        _, kk, vv = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        kk, vv = kk.reshape(tokens, kv_heads, head_dim), vv.reshape(tokens, kv_heads, head_dim)
        half = head_dim // 2
        k = torch.cat([(kk[..., :half] - kk[..., half:]).to(dtype), (kk[..., half:] + kk[..., :half]).to(dtype)], -1)
        A.write_kv(k, vv, ref_k, ref_v, slots, *kv_scales)
        assert torch.equal(got_k.cpu().view(torch.uint8), ref_k.view(torch.uint8)), (fp8, dtype, "k bytes")
        assert torch.equal(got_v.cpu().view(torch.uint8), ref_v.view(torch.uint8)), (fp8, dtype, "v bytes")

        # the readers: FP8 caches (subnormals included), dequantized on read as the torch path does
        kc, vc = (torch.randn(blocks, bs, kv_heads, head_dim) * 4).to(fp8), (torch.randn(blocks, bs, kv_heads,
                                                                                         head_dim) * 4).to(fp8)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        lens = [1, 5, 16, 17, 70, 130]
        bt = shuffled_block_tables(lens, bs, blocks)
        q = torch.randn(len(lens), heads, head_dim, dtype=dtype) * 0.1
        A.set_context(A.AttentionMetadata(None, bt, torch.tensor(lens), [1] * len(lens), lens, len(lens)))
        ref = A.paged_attention(q, kc, vc, 0.3, *kv_scales).float()
        for part_tokens in (512, 32):
            got = paged_decode_attention(dev(q), dev(kc), dev(vc), dev(bt), dev(torch.tensor(lens)), 0.3, max(lens),
                                         part_tokens, kv_scales=kv_scales).float().cpu()
            assert (got - ref).abs().max().item() < tol * ref.abs().max().item(), (fp8, dtype, "decode")
        query_lens, context_lens = [2, 40, 70, 5, 1], [2, 40, 150, 37, 9]
        bt = shuffled_block_tables(context_lens, bs, blocks)
        q = torch.randn(sum(query_lens), heads, head_dim, dtype=dtype) * 0.1
        A.set_context(A.AttentionMetadata(None, bt, torch.tensor(context_lens), query_lens, context_lens, 0))
        ref = A.paged_attention(q, kc, vc, 0.3, *kv_scales).float()
        info, tiles = prefill_tiles(query_lens, context_lens, prefill_block_q(dtype, heads // kv_heads))
        got = paged_prefill_attention(dev(q), dev(kc), dev(vc), dev(bt), dev(torch.tensor(info)),
                                      dev(torch.tensor(tiles)), 0.3, kv_scales=kv_scales).float().cpu()
        assert (got - ref).abs().max().item() < tol * ref.abs().max().item(), (fp8, dtype, "prefill")
        # and a reader that forgot the scales would be far off (the test can tell)
        assert (got - A.paged_attention(q, kc, vc, 0.3).float()).abs().max().item() > 10 * tol
    print("ok")
""")


def test_triton_fp8_kv_cache_write_and_reads_match_torch():
    """The FP8 KV cache through the Triton kernels: the fused q/k/v write stores the same bytes as the torch
    path's write_kv (e4m3 and e5m2, scales, saturation, subnormals); the decode (split and unsplit) and prefill
    kernels dequantize on read as the torch path does."""
    run_script(FP8_KV)


MODEL = textwrap.dedent("""
    import random, sys
    import torch
    from kubellm.runtime import LLM, SamplingParams
    from tests.support.hf_reference import hf_greedy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(n)] for n in [1, 2, 5, 17, 40, 100, 150]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for model in sys.argv[1:]:
        shares_prefix = prompts[-1][:100] + [7, 8, 9]
        expected = hf_greedy(model, prompts + [shares_prefix], 8)
        # 64-token chunks, 20 blocks of 16 for ~560 tokens at once: chunked prefill, mixed batches, preemption;
        # decode-only steps through the decode graphs (on the CPU: their static buffers, replayed eagerly),
        # launched ahead of the previous step's tokens (async scheduling)
        llm = LLM(model, kernels="triton", device=device, max_num_batched_tokens=64, block_size=16,
                  num_gpu_blocks=20)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.runner.graphs and llm.engine.num_steps_ahead > 0
        again = llm.generate([shares_prefix], params)[0]  # its first 6 blocks are in the prefix cache
        assert again.num_cached_tokens == 96, again.num_cached_tokens
        got.append(again.outputs[0].token_ids)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, (model, i, g, e)
    print("ok")
""")


def test_triton_model_matches_hf_greedy(tiny_models):
    """Every Triton kernel in one forward (RMSNorm + residual, q/k norm + rotary + cache write, SiLU-and-mul,
    paged prefill and decode attention, sampling) and the decode-graph path, on Llama (GQA) and Qwen3 (q/k
    norm, head_dim 32), fp32."""
    run_script(MODEL, tiny_models["llama"], tiny_models["qwen3"])


def test_triton_moe_model_matches_hf_greedy(tiny_models):
    """The fused MoE layer (routing, grouped GEMMs) in the whole model with the other kernels and the decode
    graphs: Qwen3-MoE (8 experts, top 2, a dense last layer), fp32. Mixtral's routing (weights kept in fp32)
    is in test_triton_fused_moe_matches_torch_experts."""
    run_script(MODEL, tiny_models["qwen3_moe"])


FP8_KV_MODEL = textwrap.dedent("""
    import random, sys
    import torch
    from kubellm.runtime import LLM, SamplingParams
    from tests.support.hf_reference import hf_greedy_fp8_kv
    from tests.support.kv_fp8 import with_kv_scales

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source, scaled = sys.argv[1:]
    scales = with_kv_scales(source, scaled)
    rng = random.Random(1)
    prompts = [[rng.randrange(4, 500) for _ in range(n)] for n in [1, 17, 40, 100]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    # 64-token chunks, 12 blocks of 16 for ~190 tokens at once: chunked prefill and preemption; decode graphs
    llm = LLM(scaled, kernels="triton", device=device, kv_cache_dtype="fp8", max_num_batched_tokens=64,
              block_size=16, num_gpu_blocks=12)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.runner.graphs
    assert got == hf_greedy_fp8_kv(source, prompts, 8, torch.float8_e4m3fn, scales), got
    print("ok")
""")


def test_triton_model_with_fp8_kv_matches_hf_on_rounded_kv(tiny_models, tmp_path):
    """The whole Triton path with an FP8 KV cache (the fused write, both attention kernels, the decode
    graphs) on Qwen3 with per-layer scales equals HF greedy on FP8-rounded keys and values, fp32."""
    run_script(FP8_KV_MODEL, tiny_models["qwen3"], str(tmp_path / "scaled"))


SPECULATIVE_MODEL = textwrap.dedent("""
    import json, random, sys
    import torch
    from kubellm.runtime import LLM, SamplingParams
    from tests.support.hf_reference import hf_greedy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    looping, bigram = sys.argv[1:]
    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    rng = random.Random(2)
    prompts = [[rng.randrange(4, 500) for _ in range(n)] * 3 for n in (3, 7)]
    llm = LLM(looping, kernels="triton", device=device, speculative_config=ngram)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert got == hf_greedy(looping, prompts, 16), got
    assert llm.engine.core.stats.spec.num_accepted_tokens > 0
    llm = LLM(bigram, kernels="triton", device=device, speculative_config=ngram)
    sampled = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    out = llm.generate([[42, 43, 40, 41, 42, 42, 43, 40]] * 4, sampled)
    assert all(len(o.outputs[0].token_ids) == 16 and set(o.outputs[0].token_ids) <= {40, 41, 42, 43} for o in out)
    spec = llm.engine.core.stats.spec
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens, spec
    print("ok")
""")


def test_triton_speculative_decoding(tiny_models, tmp_path):
    """N-gram speculation through the Triton path: the draft positions are rows of the fused sampler (its
    argmax for greedy requests: HF's output exactly; its Gumbel-max draws at temperature > 0, checked to
    accept some draft tokens and reject others on a bigram model; the distribution is
    test_speculative_sampling.py's, on the torch path)."""
    from tests.support.tiny_models import bigram_model, looping_model

    logits = [[0.0, 1.5, -0.5, 0.8], [1.0, 0.0, 1.2, -1.0], [-0.5, 0.5, 0.0, 1.5], [1.2, -0.3, 0.4, 0.0], [0, 0, 0, 0]]
    src = tiny_models["llama"]
    looping = looping_model(src, str(tmp_path / "looping"))
    run_script(SPECULATIVE_MODEL, looping, bigram_model(src, str(tmp_path / "bigram"), [40, 41, 42, 43], logits))


MOE = textwrap.dedent("""
    import torch
    from kubellm.runtime.model.moe import FusedExperts, route
    from kubellm.runtime.model.triton_moe import fused_moe

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # (dtype, tokens, experts, top_k, hidden, intermediate): decode-sized (16-row tiles) and prefill-sized (64-row
    # tiles) batches, sizes off the tile grid, Qwen3-30B-A3B's 128 experts / top 8 on one token
    cases = [(torch.float32, 5, 8, 2, 64, 32), (torch.float32, 70, 4, 2, 48, 40), (torch.float16, 33, 16, 4, 64, 96),
             (torch.float32, 1, 128, 8, 32, 16)]
    if device == "cuda":
        cases.append((torch.bfloat16, 300, 128, 8, 256, 128))
    for dtype, tokens, experts, top_k, hidden, inter in cases:
        layer = FusedExperts(experts, hidden, inter).to(dtype)
        layer.w13.data = (torch.randn(experts, 2 * inter, hidden) * 0.2).to(dtype)
        layer.w2.data = (torch.randn(experts, hidden, inter) * 0.2).to(dtype)
        x = torch.randn(tokens, hidden).to(dtype)
        for renormalize, weights_in_fp32 in ((True, False), (True, True), (False, False)):  # Qwen3-MoE, Mixtral
            weights, ids = route(torch.randn(tokens, experts).to(dtype), top_k, renormalize, weights_in_fp32)
            ref = layer._forward_torch(x, weights, ids).float()
            dev = lambda t: t.to(device)
            got = fused_moe(dev(x), dev(layer.w13.data), dev(layer.w2.data), dev(weights), dev(ids)).float().cpu()
            err = ((got - ref).abs() / (ref.abs() + 1)).max().item()
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), (dtype, tokens, experts, top_k, err)
    print("ok")
""")


def test_triton_fused_moe_matches_torch_experts():
    run_script(MOE)


SAMPLE = textwrap.dedent("""
    import torch
    from kubellm.runtime.model.triton_ops import sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, rows = 64, 1200  # (the interpreter runs a program in milliseconds: few rows, one column block)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((rows, vocab), float("-inf"))
    cols = torch.tensor([40, 7, 15, 63])
    logits[:, cols] = probs.log()
    for t in (1.0, 0.5):
        got = sample(logits.to(device), torch.full((rows,), t, device=device), seed=1234).cpu()
        want = probs ** (1 / t) / (probs ** (1 / t)).sum()
        freq = torch.stack([(got == c).float().mean() for c in cols])
        assert (got.unsqueeze(1) == cols).any(1).all(), "sampled a token of probability 0"
        assert (freq - want).abs().max() < 0.05, (t, freq, want)  # 1200 draws: sd <= 0.015
        # a row's draw depends on the seed and its row only
        again = sample(logits[:50].to(device), torch.full((50,), t, device=device), seed=1234).cpu()
        assert torch.equal(got[:50], again), "the same seed draws the same tokens"
        other = sample(logits[:50].to(device), torch.full((50,), t, device=device), seed=99).cpu()
        assert not torch.equal(got[:50], other)
    vocab = 2500  # more than one 1024-column block per row
    # greedy rows: the argmax, ties to the lowest index (torch.argmax); mixed with sampled rows in one batch
    x = torch.randn(6, vocab)
    x[0, 300] = x[0, 2200] = 50.0
    temps = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.7, 0.0])
    got = sample(x.to(device), temps.to(device), seed=5).cpu()
    greedy = temps == 0
    assert torch.equal(got[greedy], x.argmax(-1)[greedy]) and got[0] == 300, got
    # bf16 logits (the engine passes the LM head's output as it is): the draws of their exact fp32 widening
    half = x.bfloat16()
    assert torch.equal(sample(half.to(device), temps.to(device), seed=5).cpu(),
                       sample(half.float().to(device), temps.to(device), seed=5).cpu())
    # each row's vocabulary is split over programs (3 parts of 1024 columns here): one program per row draws
    # the same tokens, since a column's noise depends on (seed, row, column) only
    from kubellm.runtime.model import triton_ops

    split = sample(x.to(device), temps.to(device), seed=11).cpu()
    triton_ops._sample_parts = lambda rows, blocks, device: 1
    assert torch.equal(sample(x.to(device), temps.to(device), seed=11).cpu(), split)
    print("ok")
""")


def test_triton_sampler_draws_from_softmax_and_greedy_is_argmax():
    run_script(SAMPLE)


def test_kernel_choice_is_validated(tiny_model, monkeypatch):
    from kubellm.runtime import LLM
    from kubellm.runtime.model import kernels

    with pytest.raises(ValueError, match="kernels must be one of"):
        LLM(tiny_model, kernels="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.select("triton", cpu, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        kernels.select("triton", cpu, 96)
    assert kernels.select("auto", cpu, 64) is False  # the CPU's exact path
    assert kernels.select("triton", cpu, 64) is True
    assert kernels.select("torch", cpu, 64) is False


def test_triton_kernels_compile_for_hopper_and_ampere():
    """Every kernel launch the engine makes compiles for sm_90 and sm_80 within H100 / A100 shared memory
    (see tests/support/triton_compile_check.py): what the interpreter cannot check."""
    run_script("from tests.support.triton_compile_check import main; main()", interpret=False)
