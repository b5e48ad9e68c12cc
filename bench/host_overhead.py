"""Host (CPU) work per engine step, with the model replaced by a stand-in that samples random tokens at once
(bench/stand_in.py's emulated device, taking no time):
what every GPU step costs the host. Without async scheduling the GPU waits for all of it; with it (the
default), the next decode step is queued first and this work overlaps it. 256 running decodes by default;
then the runner's prep of a prefill step and of a mixed step.

    python bench/host_overhead.py --model DIR [--num-seqs 256] [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()

    from bench.offline import workload
    from bench.stand_in import DeviceModel, StandInRunner
    from kubellm.runtime import LLM, SamplingParams
    from kubellm.runtime.engine import wire

    llm = LLM(args.model, max_num_seqs=args.num_seqs, num_gpu_blocks=args.num_seqs * 200, async_scheduling=False)
    engine, runner = llm.engine, llm.engine.runner
    timings = {"schedule": 0.0, "batch prep": 0.0}
    schedule = engine.scheduler.schedule

    def timed_schedule():
        start = time.perf_counter()
        out = schedule()
        timings["schedule"] += time.perf_counter() - start
        return out

    # the model replaced by a device that takes no time (bench/stand_in.py); its launch is the batch prep
    stand_in = StandInRunner(runner, DeviceModel(0.0, 0.0, 0.0), engine.vocab_size)
    launch = stand_in.launch

    def timed_launch(out):
        start = time.perf_counter()
        launched = launch(out)
        timings["batch prep"] += time.perf_counter() - start
        return launched

    stand_in.launch = timed_launch
    engine.scheduler.schedule, engine.core.runner = timed_schedule, stand_in
    prompts, _ = workload(args.num_seqs, 100, 1024, 1, 1, engine.vocab_size, 0)
    for i, prompt in enumerate(prompts):  # outputs long enough that nobody finishes while measured
        params = SamplingParams(temperature=0.6, max_tokens=10_000, ignore_eos=True, detokenize=False)
        engine.add(engine.make_request(f"r{i}", prompt, params))
    for _ in range(50):  # prefills done: a steady batch of decodes
        engine.core.step()
    timings = dict.fromkeys(timings, 0.0)
    deltas = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        deltas_of_step = engine.core.step()
        t = time.perf_counter()
        wire.encode(wire.StepOutput(deltas_of_step, [], engine.snapshot(), 0))  # what serving adds
        deltas += time.perf_counter() - t
    total = (time.perf_counter() - start) / args.steps * 1e3
    per = {k: v / args.steps * 1e3 for k, v in timings.items()}
    rest = total - sum(per.values()) - deltas / args.steps * 1e3
    print(
        f"{engine.num_running} running decodes, {args.steps} steps: {total:.2f} ms/step = scheduler "
        f"{per['schedule']:.2f} + batch prep {per['batch prep']:.2f} + token bookkeeping {rest:.2f} + "
        f"deltas and their wire encoding (serving only) {deltas / args.steps * 1e3:.2f}"
    )
    prefill_prep(runner, engine.vocab_size)


def prefill_prep(runner, vocab: int) -> None:
    """The runner's host-side prep of a step's plan (positions, cache slots, block tables) for a prefill step
    of 8 × 1024 new tokens and a mixed step of 255 decodes + one 512-token chunk."""
    import timeit

    from kubellm.runtime import SamplingParams
    from kubellm.runtime.engine.sequence import Sequence

    rng = random.Random(1)
    next_block = iter(range(runner.num_gpu_blocks))

    def seq(length: int, computed: int) -> Sequence:
        s = Sequence("prep", 0, [rng.randrange(vocab) for _ in range(length)], SamplingParams(), 1)
        s.block_table = [next(next_block) for _ in range((length + runner.block_size - 1) // runner.block_size)]
        s.num_computed_tokens = computed
        return s

    batches = {
        "prefill 8 x 1024 tokens": [(seq(1024, 0), 1024) for _ in range(8)],
        "mixed 255 decodes + 512-token chunk": [
            (seq(n, n - 1), 1) for n in (rng.randrange(100, 1500) for _ in range(255))
        ]
        + [(seq(1024, 512), 512)],
    }
    for name, batch in batches.items():
        ms = timeit.timeit(lambda b=batch: runner._prepare(b), number=50) / 50 * 1e3
        print(f"batch prep, {name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
