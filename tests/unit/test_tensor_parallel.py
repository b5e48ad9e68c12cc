"""Tensor parallelism, run on the CPU as two processes over gloo: the sharded model reproduces HF's greedy
output token for token through everything the engine does (chunked prefill, preemption by swapping, steps
launched ahead), and its worker processes come and go with the engine."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.weights.tiny import make_tiny_model
from tests.support.hf_reference import hf_greedy
from tests.support.tiny_models import NEW_TOKENS, random_prompts


def run_two_ranks(model_dir: str, prompts: list[list[int]], device: str = "cpu") -> LLM:
    # as in test_engine_exactness: 64-token chunks, and 48 blocks for a batch that needs ~100: preemption
    llm = LLM(
        model_dir,
        tensor_parallel_size=2,
        max_num_batched_tokens=64,
        block_size=16,
        num_gpu_blocks=48,
        preemption_mode="swap",
        num_cpu_blocks=256,
        device=device,
    )
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    )
    expected = hf_greedy(model_dir, prompts, NEW_TOKENS)
    for i, (out, e) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == e, f"prompt {i} (length {len(prompts[i])}) diverged"
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0 and engine.num_steps_ahead > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return llm


@pytest.mark.parametrize(
    "device",
    [
        "cpu",  # gloo; on two GPUs: NCCL, Triton kernels and CUDA graphs with the all-reduces captured
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")],
        ),
    ],
)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_two_ranks_match_hf(tiny_models, arch, device):
    """llama: untied head, llama3 RoPE; qwen3: per-head q/k norms, head_dim apart from hidden / heads;
    qwen3_moe: every expert split over the ranks' intermediate columns, one dense layer."""
    llm = run_two_ranks(tiny_models[arch], random_prompts(), device)
    workers = llm.engine.runner.workers.procs
    assert len(workers) == 1 and workers[0].is_alive()
    llm.engine.shutdown()
    assert not workers[0].is_alive() and workers[0].exitcode == 0
    assert not multiprocessing.active_children()


def test_uneven_vocabulary_split_with_tied_embeddings_and_qkv_bias(tmp_path):
    """qwen2 (q/k/v bias, LM head tied to the embedding) with 515 vocabulary rows: rank 1's shard holds
    one padding row, which must neither be looked up nor reach the logits."""
    model = make_tiny_model(str(tmp_path / "qwen2-odd"), "qwen2", extra_vocab=3)
    prompts = random_prompts(seed=3) + [[511, 512, 513, 514, 257, 258] * 3]  # ids from both ends of the split
    run_two_ranks(model, prompts).engine.shutdown()


def test_a_split_that_does_not_divide_the_model_is_refused_before_any_process_starts(tiny_model):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the model's attention heads \(4\)"):
        LLM(tiny_model, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        LLM(tiny_model, tensor_parallel_size=0)
    assert not multiprocessing.active_children()


def test_a_worker_that_dies_before_the_group_forms_fails_the_start_at_once(tiny_model):
    """Killed while it starts (as the OOM killer or a bad GPU would): rank 0 stops waiting for it in the
    rendezvous and says which rank died, instead of waiting out the group's 10-minute timeout."""
    killed = threading.Event()

    def kill_rank_1():
        while not killed.is_set():
            for proc in multiprocessing.active_children():
                if proc.name == "kubellm-tp-1":
                    proc.kill()
                    killed.set()
            time.sleep(0.001)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 exited with code -9"):
            LLM(tiny_model, tensor_parallel_size=2, device="cpu")
    finally:
        killed.set()
    assert not multiprocessing.active_children()
    # the failed start left nothing behind: a new group forms in the same process
    llm = LLM(tiny_model, tensor_parallel_size=2, device="cpu")
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
    llm.engine.shutdown()
