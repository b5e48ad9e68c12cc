"""An emulated device for measuring the host side at GPU speed on any machine: the engine runs for real
(scheduler, block manager, batch prep, bookkeeping, the server and its streams), but the model is replaced by
a device model that takes a modeled time per step and samples random tokens.

A step occupies the emulated device for  fixed + per context token × KV tokens read + per new token × tokens
computed.  The defaults model Qwen3-0.6B in bf16 on an H100 running at its decode floor (weights 1.2 GB and
112 KB of KV per context token over ~3 TB/s, ~1.5 ms of launches per step; ~3 µs of compute per prefill
token), i.e. faster than the real engine has run there: the rate of tokens the server must keep up with.
Steps queue like CUDA launches (launch returns at once; collect waits until the device is done), so async
scheduling overlaps host work with the emulated device as it does with the GPU.

    python -m bench.stand_in serve MODEL_DIR --port 8000 [serve flags …]   # `kubellm serve` on the stand-in
    python bench/serving.py --model DIR --stand-in --concurrency 256      # offline vs serving, same stand-in
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kubellm.runtime.engine.core import EngineCore  # noqa: E402
from kubellm.runtime.engine.scheduler import SchedulerOutput  # noqa: E402
from kubellm.runtime.engine.sequence import Sequence  # noqa: E402
from kubellm.settings import EngineConfig  # noqa: E402


@dataclass(frozen=True)
class DeviceModel:
    fixed_ms: float = 1.5
    per_context_token_ns: float = 37.0
    per_new_token_us: float = 3.0
    # a roofline (roofline_of): the GEMMs take the longer of reading the weights (fixed) and computing the step's
    # tokens, and attention the longer of reading the KV and its FLOPs (per new token per position attended),
    # instead of the sum of fixed, KV and tokens
    roofline: bool = False
    attention_ps_per_position: float = 0.0

    @classmethod
    def roofline_of(
        cls, model_dir: str, bandwidth: float, flops: float, dtype="auto", quantization=None, kv_cache_dtype="auto"
    ) -> tuple[DeviceModel, int, int]:
        """(the roofline of this model on a device of `bandwidth` bytes/s and `flops` FLOP/s, its weight bytes,
        its KV bytes per token), from its config alone (the decoder built on the meta device: any size works
        on any host). Each step reads every weight and the KV of every context token at the bandwidth; each
        token computed costs 2 FLOPs per parameter it uses (an MoE token: its top-k experts; an FP8 weight's at
        twice the rate) and 4 per query dimension per layer per position it attends to. Every kernel's launch
        and inefficiency left out: a bound, not a prediction."""
        import torch

        from kubellm.runtime.model import fp8
        from kubellm.runtime.model.decoder import DecoderForCausalLM
        from kubellm.runtime.model.loader import read_model_info

        info = read_model_info(model_dir, dtype)
        shape = info.shape
        with torch.device("meta"):
            model = DecoderForCausalLM(shape, info.hf_config, 1024).to(info.dtype)
            if shape.tie_word_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            if quantization == "fp8":
                fp8.hold_projections_in_fp8(model, quantize=False)
        weight_bytes, active = 0, 0.0
        for name, p in model.named_parameters():
            weight_bytes += p.numel() * p.element_size()
            if name.endswith("embed_tokens.weight") and not shape.tie_word_embeddings:
                continue  # a lookup (the LM head is its own weight)
            share = shape.num_experts_per_tok / shape.num_experts if ".experts." in name else 1.0
            rate = 2.0 if p.element_size() == 1 else 1.0  # FP8 tensor cores: twice the bf16 FLOP/s (Ada, Hopper)
            active += p.numel() * share / rate
        kv_element = 1 if kv_cache_dtype.startswith("fp8") else info.dtype.itemsize
        kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * kv_element
        attention = 4 * shape.num_layers * shape.num_heads * shape.head_dim
        device = cls(
            weight_bytes / bandwidth * 1e3,
            kv_per_token / bandwidth * 1e9,
            2 * active / flops * 1e6,
            True,
            attention / flops * 1e12,
        )
        return device, weight_bytes, kv_per_token

    def step_seconds(self, batch: list[tuple[Sequence, int]]) -> float:
        new = sum(n for _, n in batch)
        context = sum(seq.num_computed_tokens for seq, _ in batch) + new
        fixed, compute = self.fixed_ms * 1e-3, new * self.per_new_token_us * 1e-6
        kv = context * self.per_context_token_ns * 1e-9
        if not self.roofline:
            return fixed + compute + kv
        positions = sum(n * seq.num_computed_tokens + n * (n + 1) // 2 for seq, n in batch)
        return max(fixed, compute) + max(kv, positions * self.attention_ps_per_position * 1e-12)

    def flags(self) -> list[str]:
        """The command-line flags (add_device_flags) that give this device."""
        return [
            "--stand-in-fixed-ms",
            str(self.fixed_ms),
            "--stand-in-context-ns",
            str(self.per_context_token_ns),
            "--stand-in-new-token-us",
            str(self.per_new_token_us),
        ]


@dataclass
class _Launched:
    sampling: list[Sequence]
    done_at: float
    accepted: dict[int, list[int]] | None = None  # no speculative decoding on the emulated device


class StandInRunner:
    """Takes the real runner's place in the EngineCore: same launch / launch_ahead / collect, the same host-side
    batch prep (block tables, positions and slots), then the emulated device instead of the model."""

    def __init__(self, runner, device: DeviceModel, vocab_size: int, seed: int = 0):
        self.runner, self.device, self.vocab_size = runner, device, vocab_size
        self.rng = random.Random(seed)
        self.busy_until = 0.0  # when the emulated device finishes the last queued step
        self.busy_seconds = 0.0  # emulated device time of every step queued so far
        self.steps = 0

    def __getattr__(self, name):  # num_gpu_blocks, block sizes, …: the real runner's
        return getattr(self.runner, name)

    def _queue(self, batch: list[tuple[Sequence, int]], sampling: list[Sequence]) -> _Launched:
        seconds = self.device.step_seconds(batch)
        self.busy_until = max(time.perf_counter(), self.busy_until) + seconds
        self.busy_seconds += seconds
        self.steps += 1
        return _Launched(sampling, self.busy_until)

    def launch(self, out: SchedulerOutput) -> _Launched:
        if not out.scheduled:
            return _Launched([], 0.0)
        batch = sorted(out.scheduled, key=lambda item: item[1] != 1)
        sampling = [seq for seq, n in batch if seq.num_computed_tokens + n == len(seq)]
        if len(sampling) == len(batch) and all(n == 1 for _, n in batch):  # what a decode step prepares
            positions = [seq.num_computed_tokens for seq in sampling]
            self.runner._decode_plan(sampling, positions, [seq.token_ids[p] for seq, p in zip(sampling, positions)])
        else:
            self.runner._prepare(batch)
        return self._queue(batch, sampling)

    def launch_ahead(self, prev: _Launched, keep: list[int], positions: list[int | None]) -> _Launched:
        seqs = [prev.sampling[i] for i in keep]
        self.runner._decode_plan(seqs, positions, None)
        return self._queue([(seq, 1) for seq in seqs], seqs)

    def collect(self, step: _Launched):
        wait = step.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        n = len(step.sampling)
        return step.sampling, [self.rng.randrange(self.vocab_size) for _ in range(n)], [None] * n


def stand_in_engine(config: EngineConfig, device: DeviceModel = DeviceModel()) -> EngineCore:
    """A real EngineCore (the model is loaded for its runner's host buffers and sizes) on the emulated device."""
    core = EngineCore(config)
    core.runner = StandInRunner(core.runner, device, core.vocab_size, config.seed)
    return core


@dataclass
class StandInRun:
    output_tokens: int
    seconds: float  # wall time
    device_seconds: float  # the emulated device's time over every step
    steps: int
    preemptions: int
    device: DeviceModel

    @property
    def rate(self) -> float:  # output tok/s
        return self.output_tokens / self.seconds

    @property
    def busy(self) -> float:  # what is left is host work the device waited for
        return self.device_seconds / self.seconds


def stand_in_generate(
    model: str,
    prompts: list[list[int]],
    out_lens: list[int],
    device: DeviceModel,
    hold_all_kv: bool = False,
    **engine_options,
) -> StandInRun:
    """Offline (LLM.generate, as bench/offline.py runs it) on the emulated device. hold_all_kv: the emulated
    device's KV cache holds the whole workload at once (as a GPU's does for the benchmark shapes, where this
    host's could not; nothing is allocated for it: the steps never touch it) instead of the host's cache."""
    from kubellm.runtime import LLM, SamplingParams
    from kubellm.runtime.engine.block_manager import BlockManager
    from kubellm.runtime.engine.scheduler import Scheduler

    llm = LLM(model, **engine_options)
    core = llm.engine.core
    runner = core.runner = StandInRunner(core.runner, device, core.vocab_size)
    if hold_all_kv:
        size = core.config.block_size
        runner.num_gpu_blocks = sum(-(-(len(p) + n) // size) for p, n in zip(prompts, out_lens))
        core.block_manager = BlockManager(
            runner.num_gpu_blocks, size, core.config.enable_prefix_caching, runner.num_cpu_blocks
        )
        core.scheduler = Scheduler(core.config, core.block_manager)
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, detokenize=False) for n in out_lens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    preemptions = core.scheduler.num_preemptions
    return StandInRun(tokens, elapsed, runner.busy_seconds, runner.steps, preemptions, device)


def add_device_flags(ap: argparse.ArgumentParser) -> None:
    d = DeviceModel()
    ap.add_argument("--stand-in-fixed-ms", type=float, default=d.fixed_ms, help="emulated device: ms per step")
    ap.add_argument(
        "--stand-in-context-ns",
        type=float,
        default=d.per_context_token_ns,
        help="emulated device: ns per context token read per step",
    )
    ap.add_argument(
        "--stand-in-new-token-us", type=float, default=d.per_new_token_us, help="emulated device: µs per token computed"
    )


def device_from(args: argparse.Namespace) -> DeviceModel:
    return DeviceModel(args.stand_in_fixed_ms, args.stand_in_context_ns, args.stand_in_new_token_us)


def main() -> int:
    from kubellm.cli import build_parser

    device_ap = argparse.ArgumentParser(add_help=False)
    add_device_flags(device_ap)
    device_args, rest = device_ap.parse_known_args()
    args = build_parser().parse_args(rest)
    if args.command != "serve":
        raise SystemExit("usage: python -m bench.stand_in serve MODEL_DIR [serve flags] [--stand-in-… flags]")
    return args.func(args, make_core=functools.partial(stand_in_engine, device=device_from(device_args)))


if __name__ == "__main__":
    sys.exit(main())
