"""The benchmark tools the GPU sessions depend on run end to end (tiny sizes; no figures asserted: timings
belong in bench/RESULTS.md). A broken benchmark found on the GPU costs device time that cannot be had back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--num-requests", "8", "--input-len", "10", "30", "--output-len", "5", "20"]


@pytest.fixture(scope="module")
def word_level_model(tmp_path_factory) -> str:
    from bench.shapes import make_shaped_model

    return make_shaped_model(str(tmp_path_factory.mktemp("bench") / "qwen3-tiny"), "qwen3-tiny", "float32")


def bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_offline_on_the_emulated_device_keeps_it_busy(word_level_model):
    out = bench("bench/offline.py", "--model", word_level_model, "--stand-in", *SMALL)
    busy = re.search(r"([\d,]+) output tok/s, device busy (\d+)% of the time", out)
    assert busy, out
    assert 0 < int(busy.group(2)) <= 100


def test_step_times_account_for_every_step_and_token(word_level_model):
    out = bench("bench/offline.py", "--model", word_level_model, "--step-times", *SMALL)
    steps = int(re.search(r"(\d+) steps in [\d.]+ s", out).group(1))
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith(("| computes prompt tokens", "| decode, "))
    ]
    from bench.offline import workload

    prompts, out_lens = workload(8, 10, 30, 5, 20, 151936, 0)
    assert sum(int(r[1]) for r in rows) == steps, out
    assert sum(int(r[7]) for r in rows) == sum(map(len, prompts)), out  # no prefix shared by random prompts
    assert sum(int(r[8]) for r in rows) == sum(out_lens), out


def test_serving_benchmark_against_the_stand_in_server(word_level_model):
    """Every request completes over HTTP with its tokens counted, and the offline comparison is printed."""
    out = bench(
        "bench/serving.py", "--model", word_level_model, "--stand-in", "--concurrency", "4", "--port", "8137", *SMALL
    )
    row = next(line for line in out.splitlines() if line.startswith("| concurrency 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    requests, errors, tokens = int(cells[1]), int(cells[2]), int(cells[3])
    assert (requests, errors) == (8, 0), out
    from bench.offline import workload

    assert tokens == sum(workload(8, 10, 30, 5, 20, 151936, 0)[1]), out  # every requested token streamed
    assert re.search(r"serving = \d+% of offline on the same emulated device", out), out
    assert re.search(r"server process: .* CPU µs per output token", out), out


def test_the_long_context_fp8_parts_run_and_print_what_gpu_suite_parses(tiny_models):
    """gpu_suite.sh kv8k / moe / llama8b: dummy weights, FP8 weights and an FP8 KV cache on an MoE model, with
    the step table; the "decode phase" line is the one gpu_suite.sh reads the bf16-vs-FP8 ratio from."""
    out = bench(
        "bench/offline.py",
        "--model",
        tiny_models["qwen3_moe"],
        "--load-format",
        "dummy",
        "--quantization",
        "fp8",
        "--kv-cache-dtype",
        "fp8",
        "--step-times",
        *SMALL,
    )
    line = next(line for line in out.splitlines() if line.startswith("decode phase"))
    parsed = subprocess.run(
        ["sed", r"s/.*= \([0-9,]*\) output.*/\1/; s/,//g"], input=line, capture_output=True, text=True, check=True
    )
    assert int(parsed.stdout) > 0, line
    assert "float8_e4m3fn" in line, line


def test_speculative_benchmark_checks_outputs_are_the_same(tiny_model):
    out = bench("bench/speculative.py", "--model", tiny_model, "--max-tokens", "8")
    assert re.search(r"ITL plain / ngram: [\d.]+x; outputs identical", out), out


def test_kernel_benchmark_every_part_in_the_triton_interpreter():
    proc = subprocess.run(
        [sys.executable, "bench/kernels.py", "--smoke", "--parts", "decode", "prefill", "fused", "fp8-gemm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for header in ("| seqs x context |", "| rows | projection | bf16 µs | fp8 µs |"):
        assert header in proc.stdout, proc.stdout


@pytest.mark.parametrize("arch", ["word-level qwen3", "qwen3_moe"])
def test_the_roofline_stand_in_never_beats_the_decode_floor(arch, word_level_model, tiny_models):
    """The floor is a lower bound of the roofline device's time for any schedule: a run "above 100% of floor"
    would mean the two disagree about what a step reads."""
    model = word_level_model if arch.startswith("word") else tiny_models[arch]
    out = bench("bench/offline.py", "--model", model, "--stand-in-roofline", "3.0", "700", *SMALL)
    best = re.search(
        r"0 preemptions, device time [\d.]+ s = [\d,]+ output tok/s; decode floor [\d.]+ s: at best (\d+)% of floor",
        out,
    )
    assert best, out
    assert 0 < int(best.group(1)) <= 100, out


def test_a_baseline_stopped_at_its_deadline_gives_bounds_not_figures(word_level_model):
    """A large shape's HF run may not fit a device call: stopped at the deadline, its row says so and the
    comparison becomes a bound. kubellm's figure is printed before any baseline starts."""
    out = bench(
        "bench/offline.py", "--model", word_level_model, "--baselines", "hf-cb", "--baseline-deadline", "0.001", *SMALL
    )
    lines = out.splitlines()
    early = next(i for i, line in enumerate(lines) if line.startswith("kubellm: "))
    table = next(i for i, line in enumerate(lines) if line.startswith("| engine |"))
    assert early < table, out
    assert re.search(r"stopped at the deadline with \d of 8 requests done: rate ≤ \| \d+ \| [\d.]+ \| ≤ ", out), out
    assert re.search(r"^\| kubellm \| \d+ \| [\d.]+ \| [\d,]+ \| [\d,]+ \| ≥ [\d.]+x \|", out, re.M), out
