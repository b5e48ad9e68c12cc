"""The Triton paged decode kernel, with and without the split over long contexts, equals the torch reference
(run by Triton's CPU interpreter here, natively on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from kubellm.runtime.model import attention as A
    from kubellm.runtime.model.triton_attention import paged_decode_attention

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype, heads, kv_heads, head_dim, bs in [(torch.float32, 4, 2, 16, 16), (torch.float32, 8, 1, 32, 8),
                                                 (torch.float32, 6, 6, 64, 16)]:
        blocks = 40
        kc = torch.randn(blocks, bs, kv_heads, head_dim, dtype=dtype, device=device)
        vc = torch.randn(blocks, bs, kv_heads, head_dim, dtype=dtype, device=device)
        lens = [1, 5, 16, 17, 70, 130]
        perm = torch.randperm(blocks).tolist()
        tables, used = [], 0
        for n in lens:
            nb = (n + bs - 1) // bs
            tables.append(perm[used:used + nb] + [0] * (20 - nb))
            used += nb
        bt = torch.tensor(tables, device=device)
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


def test_triton_decode_kernel_matches_torch_reference():
    env = {**os.environ}
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
