"""Online serving benchmark against a running `kubellm serve` (or one it starts), like vLLM's
benchmark_serving: Poisson arrivals at a request rate, or a fixed number of concurrent streams; reports
TTFT, TPOT and ITL percentiles and throughput.

    python bench/serving.py --model DIR --concurrency 256            # starts kubellm serve itself
    python bench/serving.py --url http://127.0.0.1:8000 --request-rate 8 --num-requests 200
    python bench/serving.py --model DIR --stand-in --concurrency 256   # the host side at GPU speed, any machine

--stand-in runs the model on an emulated device (bench/stand_in.py) and first measures the offline throughput
on the same emulated device in this process: the ratio says whether the server keeps up at GPU rates.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import aiohttp
import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.offline import workload  # noqa: E402
from bench.stand_in import add_device_flags, device_from, stand_in_generate  # noqa: E402


async def one_request(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int, result: dict):
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps = []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            result.setdefault("errors", []).append(r.status)
            return
        async for line in r.content:  # SSE lines end at \n
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            # only the last event (usage) is parsed: at GPU rates this client must not fall behind the server
            if b'"usage"' not in line:
                stamps.append(time.perf_counter())
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                result.setdefault("tokens", []).append(event["usage"]["completion_tokens"])
    end = time.perf_counter()
    if not stamps:
        return
    n = result["tokens"][-1]
    result.setdefault("ttft", []).append(stamps[0] - start)
    result.setdefault("e2e", []).append(end - start)
    if n > 1:
        result.setdefault("tpot", []).append((stamps[-1] - stamps[0]) / (n - 1))
    result.setdefault("itl", []).extend(b - a for a, b in zip(stamps, stamps[1:]))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def run(args, prompts, out_lens) -> dict:
    result: dict = {}
    connector = aiohttp.TCPConnector(limit=max(args.concurrency or 0, 512))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as client:
        start = time.perf_counter()
        if args.concurrency:
            queue = list(zip(prompts, out_lens))

            async def worker():
                while queue:
                    p, n = queue.pop()
                    await one_request(client, args.url, p, n, result)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            rng = random.Random(args.seed)
            tasks = []
            for p, n in zip(prompts, out_lens):
                tasks.append(asyncio.create_task(one_request(client, args.url, p, n, result)))
                await asyncio.sleep(rng.expovariate(args.request_rate))
            await asyncio.gather(*tasks)
        result["duration"] = time.perf_counter() - start
    return result


def start_server(args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "kubellm.cli",
        "serve",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--max-waiting-requests",
        "100000",
        "--max-queue-time-s",
        "100000",
        "--max-num-seqs",
        str(args.max_num_seqs),
    ]
    if args.stand_in:
        cmd[1:3] = ["-m", "bench.stand_in"]
        cmd += device_from(args).flags()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=open("/tmp/kubellm-bench-serve.log", "wb"))
    start = time.monotonic()
    while time.monotonic() < start + 600:
        try:
            if httpx.get(args.url + "/ready", timeout=1).status_code == 200:
                print(f"server ready {time.monotonic() - start:.1f} s after its start (model loaded, warm-up done)")
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready; see /tmp/kubellm-bench-serve.log")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(pid: int) -> dict[str, int]:
    """The HTTP server process and its engine-core child."""
    found = {"server": pid}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        found["engine"] = child
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--model", help="start `kubellm serve MODEL` for the run")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--output-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--request-rate", type=float, help="Poisson arrivals per second")
    ap.add_argument("--concurrency", type=int, help="fixed number of concurrent streams")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=None, help="token ids are drawn below this (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--stand-in",
        action="store_true",
        help="serve on an emulated device (bench/stand_in.py) and compare with offline on the same",
    )
    add_device_flags(ap)
    args = ap.parse_args()
    if not args.concurrency and not args.request_rate:
        ap.error("give --concurrency or --request-rate")
    if args.stand_in and not args.model:
        ap.error("--stand-in needs --model (the server is started here)")
    proc = None
    cpu_used: dict[str, float] = {}
    if args.model:
        args.url = f"http://127.0.0.1:{args.port}"
        proc = start_server(args)
    try:
        vocab = args.vocab or httpx.get(args.url + "/v1/models").json()["data"][0].get("vocab_size") or 500
        prompts, out_lens = workload(args.num_requests, *args.input_len, *args.output_len, vocab, args.seed)
        offline = None
        if args.stand_in:
            emulated = stand_in_generate(
                args.model, prompts, out_lens, device_from(args), max_num_seqs=args.max_num_seqs
            )
            offline = emulated.rate
            print(f"offline on the emulated device: {offline:,.0f} tok/s, device busy {emulated.busy:.0%} of the time")
        procs = server_processes(proc.pid) if proc else {}
        procs["benchmark client"] = os.getpid()
        # This process holds ~370k objects (torch, transformers, the offline run's engine): a full collection
        # takes 0.3-1 s, and one that falls inside the run stops every stream's client at once (it showed as
        # a server regression: +250 ms TTFT p50, -3% tok/s). Out of the collector's reach before measuring.
        gc.collect()
        gc.freeze()
        cpu_before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        r = asyncio.run(run(args, prompts, out_lens))
        cpu_used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in procs.items()}
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    tokens = sum(r.get("tokens", []))
    mode = f"concurrency {args.concurrency}" if args.concurrency else f"rate {args.request_rate}/s"
    print(
        "| mode | requests | errors | output tokens | time (s) | output tok/s | TTFT p50/p99 (ms) | "
        "TPOT p50/p99 (ms) | ITL p50/p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda v, q: f"{pct(v, q) * 1000:.1f}"  # noqa: E731
    print(
        f"| {mode} | {len(r.get('e2e', []))} | {len(r.get('errors', []))} | {tokens} | {r['duration']:.2f} | "
        f"{tokens / r['duration']:,.0f} | {ms(r.get('ttft', []), 50)}/{ms(r.get('ttft', []), 99)} | "
        f"{ms(r.get('tpot', []), 50)}/{ms(r.get('tpot', []), 99)} | "
        f"{ms(r.get('itl', []), 50)}/{ms(r.get('itl', []), 99)} |"
    )
    if r.get("tpot"):
        print(f"(mean TPOT {statistics.mean(r['tpot']) * 1000:.1f} ms)")
    if offline:
        print(f"serving = {tokens / r['duration'] / offline:.0%} of offline on the same emulated device")
    for name, seconds in cpu_used.items():  # what each process spends per streamed token, whatever the device
        print(f"{name} process: {seconds:.1f} CPU s = {seconds / max(tokens, 1) * 1e6:.0f} CPU µs per output token")


if __name__ == "__main__":
    main()
