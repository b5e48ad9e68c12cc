"""Offline throughput on nano-vllm's workload: 256 requests, prompt lengths U[100,1024], output lengths
U[100,1024], random token ids, EOS ignored, seed 0.

    python bench/offline.py --model DIR            # any model dir
    python bench/offline.py --shape qwen3-0.6b     # a random bf16 model of that shape (made once)
    python bench/offline.py --shape qwen3-0.6b --baselines hf-static hf-cb   # the issue-6 table, one run
    python bench/offline.py --shape qwen3-0.6b --profile-steps 50            # where a step's time goes
    python bench/offline.py --shape llama-3.2-1b --step-times   # where the run's time goes, by kind of step
    python bench/offline.py --shape qwen3-tiny --stand-in    # host side at H100 speed on any machine (stand_in.py)
    python bench/offline.py --shape llama-3.1-8b --stand-in-roofline 4.8 700   # the best "of floor" the schedule
                                                # allows on an H200's roofline (any shape, on any machine)
    python bench/offline.py --shape qwen3-0.6b --num-requests 64 --input-len 8192 8192 --output-len 1024 1024 \
        --kv-cache-dtype fp8 --step-times       # the decode phase of a long-context run with an FP8 KV cache
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.stand_in import DeviceModel, add_device_flags, device_from, stand_in_generate  # noqa: E402


def workload(num_requests: int, min_in: int, max_in: int, min_out: int, max_out: int, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab - 1) for _ in range(rng.randint(min_in, max_in))] for _ in range(num_requests)]
    outputs = [rng.randint(min_out, max_out) for _ in range(num_requests)]
    return prompts, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--shape", help="make (once) and use a random model of this shape: qwen3-0.6b, llama-3.2-1b")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/kubellm/bench-models"))
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--output-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights made on the device from config.json (with --shape: no weights written)",
    )
    ap.add_argument(
        "--quantization",
        choices=["fp8"],
        help="fp8: the linear weights quantized at load (FP8 matmuls on Ada/Hopper; the floor counts their bytes)",
    )
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="torch: the unfused path (no CUDA graphs), to see what the Triton kernels buy",
    )
    ap.add_argument(
        "--baselines",
        nargs="*",
        default=[],
        choices=["hf-static", "hf-cb", "hf-cb-eager"],
        help="also run HF transformers on the same model and workload, after kubellm",
    )
    ap.add_argument(
        "--baseline-deadline",
        type=float,
        help="seconds: an HF baseline still running then is stopped, and the table gives bounds (its rate at "
        "most the tokens asked for over that time; kubellm at least that many times faster)",
    )
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many engine steps from the middle of the run and print where time goes",
    )
    ap.add_argument(
        "--step-times",
        action="store_true",
        help="time every engine step and print the run's time by kind of step against each kind's floor",
    )
    ap.add_argument(
        "--stand-in",
        action="store_true",
        help="run on an emulated device (bench/stand_in.py): is the host fast enough to keep it busy?",
    )
    add_device_flags(ap)
    ap.add_argument(
        "--stand-in-roofline",
        type=float,
        nargs=2,
        metavar=("TB/s", "TFLOP/s"),
        help="run on an emulated device that is this model's roofline on a GPU of this bandwidth and compute "
        "(e.g. 4.8 700 for an H200): how close to the decode floor the schedule itself lets a run come",
    )
    args = ap.parse_args()

    from kubellm.runtime import LLM, SamplingParams

    model = args.model
    if args.shape:
        from bench.shapes import make_shaped_model

        weights = args.load_format != "dummy" and not args.stand_in_roofline  # the roofline reads the config
        model = make_shaped_model(
            os.path.join(args.cache_dir, f"{args.shape}-wordlevel{'' if weights else '-config-only'}"),
            args.shape,
            weights=weights,
        )
    engine_options = dict(
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        kernels=args.kernels,
        load_format=args.load_format,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if args.stand_in_roofline:
        roofline(args, model, engine_options)
        return
    if args.stand_in:
        with open(os.path.join(model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        prompts, out_lens = workload(args.num_requests, *args.input_len, *args.output_len, vocab, args.seed)
        run = stand_in_generate(model, prompts, out_lens, device_from(args), **engine_options)
        print(f"emulated device {run.device}: {run.rate:,.0f} output tok/s, device busy {run.busy:.0%} of the time")
        return
    llm = LLM(model, **engine_options)
    vocab = llm.engine.vocab_size
    prompts, out_lens = workload(args.num_requests, *args.input_len, *args.output_len, vocab, args.seed)
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, detokenize=False) for n in out_lens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, detokenize=False))  # warm-up
    if args.profile_steps:
        profile(llm, prompts, params, args.profile_steps)
        return
    if args.step_times:
        step_times(llm, prompts, params)
        return
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(out_lens)
    runner = llm.engine.runner
    weights = f", {args.quantization} weights" if args.quantization else ""
    name = f"{args.shape or os.path.basename(model)} ({runner.info.dtype}{weights}, KV cache {runner.kv_dtype})"
    rows = [("kubellm", generated, elapsed, llm.engine.scheduler.num_preemptions, True)]
    weight_bytes, kv_bytes_per_token = model_bytes(runner)
    device, dtype = str(runner.device), runner.info.dtype
    del llm, runner, outs
    free_device_memory()

    from bench import hf_baselines as hf

    bandwidth = hf.copy_bandwidth()
    floor_s = hf.decode_floor_seconds(prompts, out_lens, weight_bytes, kv_bytes_per_token, bandwidth, args.max_num_seqs)
    floor = sum(out_lens) / floor_s if floor_s == floor_s else float("nan")
    rate = generated / elapsed
    # before the baselines: a device call that runs out of time during HF's run still has this figure
    of_floor = f" = {rate / floor:.0%} of the decode floor" if floor == floor else ""
    print(f"kubellm: {generated} output tokens in {elapsed:.2f} s = {rate:,.0f} output tok/s{of_floor}", flush=True)
    for base in args.baselines:
        if base == "hf-static":
            label = "HF generate, static batches of 64"
            run = hf.hf_static(model, args.dtype, prompts, out_lens, deadline=args.baseline_deadline)
        else:
            eager = base == "hf-cb-eager"
            label = "HF continuous batching (paged sdpa" + (")" if eager else ", CUDA graphs)")
            run = hf.hf_continuous(model, args.dtype, prompts, out_lens, not eager, args.baseline_deadline)
        if not run.complete:
            label += f", stopped at the deadline with {run.done} of {run.requests} requests done: rate ≤"
        rows.append((label, run.tokens, run.seconds, "", run.complete))
        free_device_memory()

    continuous = [r for r in rows if r[0].startswith("HF continuous")]
    hf_cb = next((r for r in continuous if "CUDA graphs" in r[0]), continuous[0] if continuous else None)
    total_prompt = sum(map(len, prompts))
    print(
        f"model {name}, device {device}, {len(prompts)} requests, {total_prompt} prompt tokens, "
        f"{sum(out_lens)} output tokens requested"
    )
    print("| engine | output tokens | time (s) | output tok/s | total tok/s | vs HF CB | of floor | preemptions |")
    print("|---|---|---|---|---|---|---|---|")
    for label, tokens, seconds, preemptions, complete in rows:
        rate = tokens / seconds
        at_most = "" if complete else "≤ "  # a baseline stopped at its deadline: its rate is a bound
        vs_cb = "-"
        if hf_cb:
            at_least = "≥ " if complete and not hf_cb[4] else ""  # against that bound, a speed-up is a bound too
            vs_cb = f"{at_least}{rate / (hf_cb[1] / hf_cb[2]):.1f}x"
        of_floor = f"{at_most}{rate / floor:.0%}" if floor == floor else "-"
        print(
            f"| {label} | {tokens} | {seconds:.2f} | {at_most}{rate:,.0f} | "
            f"{(tokens + total_prompt) / seconds:,.0f} | {vs_cb} | {of_floor} | {preemptions} |"
        )
    if floor == floor:
        print(
            f"decode floor: {floor:,.0f} tok/s ({floor_s:.2f} s) = weights {weight_bytes / 1e9:.2f} GB + live KV "
            f"({kv_bytes_per_token} B/token) per step at {bandwidth / 1e12:.2f} TB/s measured copy bandwidth, "
            f"{dtype}"
        )


def roofline(args, model: str, engine_options: dict) -> None:
    """The real scheduler on this model's roofline (DeviceModel.roofline_of) with the GPU's KV capacity (the
    whole workload's KV at once, as an H100 or H200 holds it for these shapes): how close to the decode floor
    the schedule itself lets a run come. The steps are scheduled over a tiny model of the same tokens (the
    schedule depends on token counts, not on the weights), so any shape runs on any host."""
    from bench import hf_baselines as hf
    from bench.shapes import make_shaped_model

    bandwidth, flops = args.stand_in_roofline[0] * 1e12, args.stand_in_roofline[1] * 1e12
    device, weight_bytes, kv_per_token = DeviceModel.roofline_of(
        model, bandwidth, flops, args.dtype, args.quantization, args.kv_cache_dtype
    )
    tiny = make_shaped_model(os.path.join(args.cache_dir, "qwen3-tiny-wordlevel"), "qwen3-tiny")
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts, out_lens = workload(args.num_requests, *args.input_len, *args.output_len, vocab, args.seed)
    options = {**engine_options, "load_format": "auto", "quantization": None, "kv_cache_dtype": "auto"}
    run = stand_in_generate(tiny, prompts, out_lens, device, hold_all_kv=True, **options)
    floor_s = hf.decode_floor_seconds(prompts, out_lens, weight_bytes, kv_per_token, bandwidth, args.max_num_seqs)
    print(
        f"{args.shape or model} on the roofline of {args.stand_in_roofline[0]} TB/s, {args.stand_in_roofline[1]} "
        f"TFLOP/s (weights {weight_bytes / 1e9:.2f} GB, KV {kv_per_token} B/token): {run.steps} steps, "
        f"{run.preemptions} preemptions, device time {run.device_seconds:.2f} s = "
        f"{run.output_tokens / run.device_seconds:,.0f} output tok/s; decode floor {floor_s:.2f} s: "
        f"at best {floor_s / run.device_seconds:.0%} of floor"
    )


def model_bytes(runner) -> tuple[int, int]:
    """(bytes of the weights, bytes of KV cache per token) of a model runner: what a decode step reads."""
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    return weight_bytes, runner.block_bytes // runner.block_size


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile(llm, prompts, params, steps: int) -> None:
    """Run the workload, profiling `steps` engine steps once the batch is full, and print the kernels and the
    share of wall time the GPU was busy (the rest is per-step CPU work the GPU waits for)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add(engine.make_request(f"p{i}", p, sp))
    for _ in range(64):  # past the first prefills: a steady mixed batch
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 if torch.cuda.is_available() else 0
    print(
        f"{steps} steps in {wall:.3f} s ({wall / steps * 1e3:.2f} ms/step); device busy {busy:.3f} s "
        f"({busy / wall:.0%} of wall)"
    )


DECODE_BUCKETS = (256, 192, 128, 64, 32, 16, 1, 0)  # decode-only steps by batch size: at least this many rows


def step_times(llm, prompts, params) -> None:
    """Run the workload one engine step at a time, timing each (with async scheduling the host waits on the
    device, so a step's wall time is the device's), and print the run's time by kind of step: steps that
    compute prompt tokens, and decode-only steps by batch size, each against its bytes over the copy bandwidth
    (weights + the KV the step reads). Which kind is furthest from its floor is what to work on."""
    from bench import hf_baselines as hf

    engine, runner = llm.engine, llm.engine.runner
    weight_bytes, kv_per_token = model_bytes(runner)
    bandwidth = hf.copy_bandwidth()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add(engine.make_request(f"s{i}", p, sp))
    kinds: dict[str, list[float]] = {}  # kind → [steps, seconds, floor seconds, prompt tokens, rows]
    start = last = time.perf_counter()
    while engine.has_unfinished_requests():
        context = sum(len(seq) for seq in engine.scheduler.running)  # KV the step reads (about: before it runs)
        prompt_before, rows_before = engine.stats.prompt_tokens, engine.stats.generation_tokens
        engine.step()
        now = time.perf_counter()
        prompt, rows = engine.stats.prompt_tokens - prompt_before, engine.stats.generation_tokens - rows_before
        bucket = next(b for b in DECODE_BUCKETS if rows >= b)
        kind = "computes prompt tokens" if prompt else f"decode, ≥ {bucket} rows"
        k = kinds.setdefault(kind, [0, 0.0, 0.0, 0, 0])
        k[0] += 1
        k[1] += now - last
        k[2] += (weight_bytes + context * kv_per_token) / bandwidth
        k[3] += prompt
        k[4] += rows
        last = now
    total = last - start
    print(
        f"{sum(k[0] for k in kinds.values())} steps in {total:.2f} s; floor per step = (weights "
        f"{weight_bytes / 1e9:.2f} GB + KV read) / {bandwidth / 1e12:.2f} TB/s"
    )
    print("| steps | count | time (s) | share | ms/step | floor ms/step | of floor | prompt tokens | output tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, (n, secs, floor, prompt, rows) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        floors = f"{floor / n * 1e3:.2f} | {floor / secs:.0%}" if floor == floor else "- | -"  # no GPU: nan
        print(
            f"| {kind} | {n} | {secs:.2f} | {secs / total:.0%} | {secs / n * 1e3:.2f} | {floors} | {prompt} | {rows} |"
        )
    decode = [k for kind, k in kinds.items() if kind.startswith("decode")]
    tokens, secs = sum(k[4] for k in decode), sum(k[1] for k in decode)
    print(
        f"decode phase: {tokens} output tokens in {secs:.2f} s = {tokens / max(secs, 1e-9):,.0f} output tok/s "
        f"(KV cache {runner.kv_dtype}, {runner.num_gpu_blocks} blocks of {runner.block_size}, "
        f"{engine.scheduler.num_preemptions} preemptions)"
    )


if __name__ == "__main__":
    main()
