"""`kubellm router` in front of lightweight fake pods (tests/support/fake_backend.py: SSE at a fixed token rate,
/metrics reflecting their load): what the router itself costs and how it spreads work, without GPUs.

    python bench/router.py                     # all three parts, ~4 minutes on a 2-core VM
    python bench/router.py --parts affinity --backends 2,4,8,16

1. latency: sequential 1-token completions, straight to a fake pod vs through the router: the router's added
   latency per request (p50, p99).
2. streams: N concurrent streams (20 tokens at 200 tok/s each) through one router process for a fixed time:
   completed streams per second, the router's CPU share, errors.
3. affinity: multi-turn chats (each turn resends the conversation) through the router as the fake pods go
   2 → 16: prefix-cache hit rate as the pods count it (a request whose first 64 characters that pod served
   before), and load balance (busiest pod's requests / mean), for the prefix policy and least-load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import aiohttp
import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.support.router import FakeBackends, RouterProcess  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latencies(url: str, n: int) -> list[float]:
    body = {"model": "fake", "prompt": "hello", "max_tokens": 1}
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            t = time.perf_counter()
            async with s.post(url + "/v1/completions", json=body) as r:
                await r.read()
                assert r.status == 200, r.status
            out.append(time.perf_counter() - t)
    return out


def part_latency(tmp: str, n: int) -> None:
    pods = FakeBackends(1, token_rate=100000)
    router = RouterProcess(f"{tmp}/routes.json", {"fake": pods.urls})
    try:
        asyncio.run(latencies(router.url, 50))  # warm both paths
        direct, routed = [], []
        for _ in range(4):  # interleaved, so that background load hits both alike
            direct += asyncio.run(latencies(pods.urls[0], n // 4))
            routed += asyncio.run(latencies(router.url, n // 4))
        d50, d99, r50, r99 = pct(direct, 50), pct(direct, 99), pct(routed, 50), pct(routed, 99)
        print(
            f"| latency | {n} sequential 1-token requests | direct p50 {d50 * 1e3:.2f} ms, p99 {d99 * 1e3:.2f} ms "
            f"| via router p50 {r50 * 1e3:.2f} ms, p99 {r99 * 1e3:.2f} ms | added p50 {(r50 - d50) * 1e3:.2f} ms, "
            f"p99 {(r99 - d99) * 1e3:.2f} ms |"
        )
    finally:
        router.stop()
        pods.stop()


async def stream_load(urls: list[str], concurrency: int, seconds: float) -> tuple[int, int]:
    done = errors = 0
    stop = time.monotonic() + seconds
    body = {"model": "fake", "prompt": "x", "max_tokens": 20, "stream": True}

    async def worker(s: aiohttp.ClientSession, i: int):
        nonlocal done, errors
        while time.monotonic() < stop:
            try:
                url = urls[i % len(urls)]
                async with s.post(url + "/v1/completions", json={**body, "prompt": f"user {i} {done}"}) as r:
                    if r.status != 200:
                        errors += 1
                        await r.read()
                        continue
                    async for _ in r.content:
                        pass
                done += 1
            except aiohttp.ClientError:
                errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(worker(s, i) for i in range(concurrency)))
    return done, errors


def part_streams(tmp: str, concurrency: int, seconds: float, backends: int) -> None:
    """The same load straight to the pods (the client spreads it) and through the router: on a shared 2-core
    machine the client and the fake pods compete with the router, so its CPU per stream is the figure that
    carries over (one core / that = the streams/s one router process could sustain)."""
    pods = FakeBackends(backends, token_rate=200, slots=1024)
    router = RouterProcess(f"{tmp}/routes.json", {"fake": pods.urls}, "--max-in-flight-per-pod", "100000")
    try:
        t0 = time.monotonic()
        done, errors = asyncio.run(stream_load(pods.urls, concurrency, seconds))
        direct = done / (time.monotonic() - t0)
        cpu0, t0 = cpu_seconds(router.proc.pid), time.monotonic()
        done, errors = asyncio.run(stream_load([router.url], concurrency, seconds))
        cpu, wall = cpu_seconds(router.proc.pid) - cpu0, time.monotonic() - t0
        per_stream_ms = 1000 * cpu / max(1, done)
        print(
            f"| streams | {concurrency} concurrent, 20 tokens at 200 tok/s, {backends} pods, {seconds:.0f} s | "
            f"direct {direct:.1f} streams/s, via router {done / wall:.1f} streams/s | router CPU "
            f"{100 * cpu / wall:.0f}% of a core, {per_stream_ms:.2f} ms per stream (21 SSE events) -> "
            f"~{1000 / per_stream_ms:.0f} streams/s per core | {errors} errors |"
        )
    finally:
        router.stop()
        pods.stop()


async def conversations(url: str, convs: int, turns: int, concurrency: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    errors = 0
    filler = "You are a helpful assistant. Answer briefly."

    async def conversation(s: aiohttp.ClientSession, c: int):
        nonlocal errors
        messages = [{"role": "system", "content": f"conversation {c:04d}: {filler}"}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"question {t}"})
            async with (
                sem,
                s.post(
                    url + "/v1/chat/completions", json={"model": "fake", "messages": messages, "max_tokens": 4}
                ) as r,
            ):
                errors += r.status != 200
                answer = (await r.json())["choices"][0]["message"]["content"] if r.status == 200 else ""
            messages.append({"role": "assistant", "content": answer})

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(conversation(s, c) for c in range(convs)))
    return errors


def part_affinity(tmp: str, counts: list[int], convs: int, turns: int, concurrency: int) -> None:
    for n in counts:
        for policy in ("prefix", "least-load"):
            pods = FakeBackends(n, token_rate=400)
            router = RouterProcess(f"{tmp}/routes.json", {"fake": pods.urls}, "--policy", policy)
            try:
                errors = asyncio.run(conversations(router.url, convs, turns, concurrency))
                served, hits = [], 0
                for u in pods.urls:
                    text = httpx.get(u + "/metrics").text
                    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("fake_"))
                    served.append(int(values["fake_requests_total"]))
                    hits += int(values["fake_prefix_hits_total"])
                possible = convs * (turns - 1)  # every turn after a conversation's first could hit
                mean = statistics.mean(served)
                print(
                    f"| affinity | {n} pods, {policy} | {convs} chats x {turns} turns, {concurrency} at once | "
                    f"{hits} prefix hits of {possible} possible ({hits / possible:.1%}) | busiest pod "
                    f"{max(served) / mean:.2f}x mean, idlest {min(served) / mean:.2f}x | {errors} errors |"
                )
            finally:
                router.stop()
                pods.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="latency,streams,affinity")
    p.add_argument("--requests", type=int, default=2000, help="latency: requests per path")
    p.add_argument("--concurrency", type=int, default=256, help="streams: concurrent streams")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--stream-backends", type=int, default=8)
    p.add_argument("--backends", default="2,4,8,16")
    p.add_argument("--conversations", type=int, default=128)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--chat-concurrency", type=int, default=32)
    a = p.parse_args()
    parts = a.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "latency" in parts:
            part_latency(tmp, a.requests)
        if "streams" in parts:
            part_streams(tmp, a.concurrency, a.seconds, a.stream_backends)
        if "affinity" in parts:
            counts = [int(x) for x in a.backends.split(",")]
            part_affinity(tmp, counts, a.conversations, a.turns, a.chat_concurrency)


if __name__ == "__main__":
    main()
