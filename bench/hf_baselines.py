"""What bench/offline.py compares against in the same run: HF transformers `generate` in static batches, HF
transformers' own continuous batching (`init_continuous_batching`, paged attention, CUDA graphs when it
offers them), and the decode floor (bytes of weights and live KV read per step at the measured bandwidth).

Each HF run returns a Baseline. Given a deadline (seconds), a run still going then is stopped and reports the
tokens it was asked for over the time it had: more than its rate, so what is compared with it is a bound —
kubellm is at least that many times faster (the large shapes' HF runs do not fit one 10-minute device call).
transformers' continuous-batching API moved between 5.x releases, so options are passed only where this
version has them.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import NamedTuple


class Baseline(NamedTuple):
    tokens: int  # output tokens generated; if stopped at the deadline, the tokens requested
    seconds: float
    done: int  # requests finished
    requests: int

    @property
    def complete(self) -> bool:
        return self.done == self.requests


def load_hf(model_dir: str, dtype: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype), "attn_implementation": attn}
    if not any(name.endswith(".safetensors") for name in os.listdir(model_dir)):  # a shape without weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        if dtype == "auto":
            config_dtype = getattr(config, "dtype", None) or torch.bfloat16
            kwargs["dtype"] = getattr(torch, config_dtype) if isinstance(config_dtype, str) else config_dtype
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()


def _sampling(model, max_new_tokens: int):
    from transformers import GenerationConfig

    # EOS never ends a request (the workload fixes every output length), as in our run's ignore_eos
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.6,
        top_k=0,
        top_p=1.0,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id or 0,
    )


def hf_static(
    model_dir: str,
    dtype: str,
    prompts: list[list[int]],
    out_lens: list[int],
    batch_size: int = 64,
    deadline: float | None = None,
) -> Baseline:
    """`generate` over batches of `batch_size` in arrival order, left-padded; each batch runs to its longest
    output, and only the tokens each request asked for are counted. The deadline is checked between batches."""
    import torch

    model = load_hf(model_dir, dtype, "sdpa")
    device = model.device
    pad = model.config.pad_token_id or 0

    def run(batch, lens):
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=_sampling(model, max(lens)))

    run([prompts[0][:8]], [4])  # warm-up
    _sync()
    start = time.perf_counter()
    done = 0
    for i in range(0, len(prompts), batch_size):
        if deadline is not None and time.perf_counter() - start > deadline:
            break
        run(prompts[i : i + batch_size], out_lens[i : i + batch_size])
        done = min(i + batch_size, len(prompts))
    _sync()
    return Baseline(sum(out_lens), time.perf_counter() - start, done, len(prompts))


def hf_continuous(
    model_dir: str,
    dtype: str,
    prompts: list[list[int]],
    out_lens: list[int],
    cuda_graphs: bool = True,
    deadline: float | None = None,
) -> Baseline:
    """HF continuous batching: every request added up front with its own max_new_tokens."""
    from transformers import generation

    model = None
    for attn in ("paged|sdpa", "sdpa_paged"):  # the name changed within 5.x
        try:
            model = load_hf(model_dir, dtype, attn)
            break
        except (ValueError, KeyError):
            continue
    if model is None:
        raise RuntimeError("this transformers has no paged SDPA attention")
    options = {"use_cuda_graph": cuda_graphs, "max_queue_size": 0}
    init = {"generation_config": _sampling(model, max(out_lens))}
    config_cls = getattr(generation, "ContinuousBatchingConfig", None)
    if config_cls is not None:
        accepted = inspect.signature(config_cls).parameters
        init["continuous_batching_config"] = config_cls(**{k: v for k, v in options.items() if k in accepted})
    elif cuda_graphs:
        init["generation_config"].use_cuda_graph = True  # older 5.x read it from the generation config
    manager = model.init_continuous_batching(**init)
    manager.start()
    try:
        _sync()
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        generated = done = 0
        while done < len(prompts):
            left = None if deadline is None else deadline - (time.perf_counter() - start)
            if left is not None and left <= 0:
                return Baseline(sum(out_lens), time.perf_counter() - start, done, len(prompts))
            wait = 300 if left is None else min(300, left)  # the first 8k-prompt request finishes after minutes
            result = manager.get_result(timeout=wait)
            if result is None:
                if left is not None and left <= 300:
                    continue  # the wait ran to the deadline, not a stall: returned above
                raise RuntimeError(f"HF continuous batching stalled after {done} of {len(prompts)} requests")
            if result.is_finished():
                done += 1
                generated += len(result.generated_tokens)
        _sync()
        return Baseline(generated, time.perf_counter() - start, done, len(prompts))
    finally:
        manager.stop(block=True)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written (what a decode step does to
    weights and KV is read; this is the best case for streaming memory)."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - start)


def decode_floor_seconds(
    prompts: list[list[int]],
    out_lens: list[int],
    weight_bytes: int,
    kv_bytes_per_token: int,
    bandwidth: float,
    max_batch: int,
) -> float:
    """A lower bound on decode time: requests decode max_batch at a time from step 1, and every step reads all
    weights once plus the KV of every live sequence (prefill compute is left out)."""
    total = 0.0
    pending = sorted(zip(map(len, prompts), out_lens), key=lambda x: x[1])
    for first in range(0, len(pending), max_batch):
        wave = pending[first : first + max_batch]
        steps = max(n for _, n in wave)
        for t in range(steps):
            live = sum(p + t for p, n in wave if n > t)
            total += (weight_bytes + live * kv_bytes_per_token) / bandwidth
    return total
