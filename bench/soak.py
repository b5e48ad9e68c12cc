"""Soak: N minutes (default 10) of mixed valid, abusive and overload traffic against one `kubellm serve`.

    python -m bench.soak [--model DIR] [--minutes 10] [--url URL (a running server; else one is started)]

Prints requests by kind and status, and fails (exit 1) on any 500/502/504, a 429/503 without Retry-After, a
/health that failed, or gauges (running, waiting, KV usage) not back to 0 at the end. Also prints the p50/p99
/max of /health latency during the run and the server's resident memory (server + engine process) before
and after. Issue 16's "Must show"; figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import httpx

KEYS = {"valid": "sk-soak-valid", "flood": "sk-soak-flood", "abuse": "sk-soak-abuse"}
SERVER_FLAGS = [
    "--max-model-len", "512",
    "--max-num-seqs", "16",
    "--max-waiting-requests", "32",
    "--max-queue-time-s", "10",
    "--rate-limit-rpm", "1200",
    "--rate-limit-burst", "40",
    "--header-timeout-s", "5",
    "--body-timeout-s", "5",
    "--drain-timeout-s", "5",
    "--max-body-bytes", str(1 << 20),
]  # fmt: skip


def auth(kind: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[kind]}"}


class Tally:
    def __init__(self):
        self.by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.bad: list[str] = []  # what fails the soak

    def record(self, kind: str, r: httpx.Response | None, note: str = "") -> None:
        if r is None:
            self.by_kind[kind][note or "closed"] += 1
            return
        self.by_kind[kind][r.status_code] += 1
        if r.status_code in (500, 502, 504):
            self.bad.append(f"{kind}: {r.status_code} {r.text[:300]}")
        if r.status_code in (429, 503) and "retry-after" not in r.headers:
            self.bad.append(f"{kind}: {r.status_code} without Retry-After: {r.text[:200]}")


# ---------------------------------------------------------------------- traffic
def valid_body(rng: random.Random) -> tuple[str, dict]:
    if rng.random() < 0.5:
        body = {
            "prompt": rng.choice(["Once upon a time", "The capital of", [1, 2, 3, 4]]),
            "max_tokens": rng.randint(1, 32),
        }
        path = "/v1/completions"
    else:
        body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": rng.randint(1, 32)}
        path = "/v1/chat/completions"
    body.update(
        rng.choice(
            [
                {},
                {"temperature": 0.7, "top_p": 0.9},
                {"n": 2},
                {"seed": rng.randrange(2**63)},
                {"top_k": 50},
                {"stream": True},
            ]
        )
    )
    return path, body


async def valid_traffic(client: httpx.AsyncClient, url: str, tally: Tally, until: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        path, body = valid_body(rng)
        try:
            if body.get("stream"):
                async with client.stream("POST", url + path, json=body, headers=auth("valid")) as r:
                    async for _ in r.aiter_lines():
                        pass
                    tally.record("valid", r)
            else:
                tally.record("valid", await client.post(url + path, json=body, headers=auth("valid")))
        except httpx.HTTPError as e:
            tally.record("valid", None, f"error:{type(e).__name__}")
        await asyncio.sleep(rng.random() * 0.2)


ABUSIVE_BODIES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 9223372036854775808, "top_p": 0.5}),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}),
    ("/v1/completions", {"prompt": "hi", "priority": 10**30}),
    ("/v1/completions", {"prompt": [[10**20]]}),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**63]}),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999999": 5}}),
    ("/v1/completions", {"prompt": [[1]] * 300, "max_tokens": 1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200_000}]}),
    ("/tokenize", {"prompt": "y" * 900_000}),
    ("/detokenize", {"tokens": [2**40]}),
]
ABUSIVE_RAW = [
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 1}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\udfff"}'),
    ("/v1/completions", b"[" * 50_000 + b"]" * 50_000),
    ("/v1/completions", b'{"prompt": "hi", "x": ' + b"{" * 3000),
    ("/v1/completions", b"not json"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity, "top_p": NaN}'),
    ("/v1/completions", b'{"prompt": "' + b"z" * (2 << 20) + b'"}'),  # past --max-body-bytes
]


async def raw_http(port: int, data: bytes, linger: float = 0.0) -> bytes:
    """Send bytes on a fresh connection; what came back before the server closed it (or we gave up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if linger:
            await asyncio.sleep(linger)
            return b""
        return await asyncio.wait_for(reader.read(1 << 16), 30)
    except (TimeoutError, ConnectionError):
        return b""
    finally:
        writer.close()


def raw_status(answer: bytes) -> int | str:
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "closed"


async def abusive_traffic(client: httpx.AsyncClient, url: str, port: int, tally: Tally, until: float, seed: int):
    rng = random.Random(seed)
    while time.monotonic() < until:
        what = rng.randrange(10)
        try:
            if what < 4:
                path, body = rng.choice(ABUSIVE_BODIES)
                tally.record("abusive", await client.post(url + path, json=body, headers=auth("abuse")))
            elif what < 6:
                path, raw = rng.choice(ABUSIVE_RAW)
                tally.record("abusive", await client.post(url + path, content=raw, headers=auth("abuse")))
            elif what == 6:  # wrong key, or none
                tally.record("abusive", await client.post(url + "/v1/completions", json={"prompt": "hi"}))
            elif what == 7:  # header abuse over a raw socket
                head = rng.choice(
                    [
                        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 << 20) + b"\r\n\r\n",
                        b"GET /health HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-%d: 1\r\n" % i for i in range(500))
                        + b"\r\n",
                    ]
                )
                tally.by_kind["abusive-raw"][raw_status(await raw_http(port, head))] += 1
            elif what == 8:  # a body cut off midway, a slow body (the server's body deadline)
                cut = b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{"prompt": '
                answer = await raw_http(port, cut, linger=rng.choice([0.0, 0.01]) or 0.01)
                tally.by_kind["abusive-raw"][raw_status(answer)] += 1
            else:  # a stream abandoned after a few events
                body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
                async with client.stream("POST", url + "/v1/completions", json=body, headers=auth("abuse")) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n > 3:
                            break
                    tally.record("abusive", r)
        except httpx.HTTPError as e:
            tally.record("abusive", None, f"error:{type(e).__name__}")
        await asyncio.sleep(rng.random() * 0.1)


async def overload_traffic(client: httpx.AsyncClient, url: str, tally: Tally, until: float, seed: int) -> None:
    """Bursts far past --max-waiting-requests and the flood key's rate limit."""
    rng = random.Random(seed)

    async def one():
        body = {"prompt": "Tell me a story", "max_tokens": rng.randint(50, 200), "ignore_eos": True}
        if rng.random() < 0.3:
            body = {"prompt": [[1, 2, 3]] * 40, "max_tokens": 4, "n": 2}
        try:
            tally.record("overload", await client.post(url + "/v1/completions", json=body, headers=auth("flood")))
        except httpx.HTTPError as e:
            tally.record("overload", None, f"error:{type(e).__name__}")

    while time.monotonic() < until:
        await asyncio.gather(*(one() for _ in range(rng.randint(20, 60))))
        await asyncio.sleep(rng.random() * 3)


async def health_poller(url: str, tally: Tally, until: float, latencies: list[float]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                r = await client.get(url + "/health")
                latencies.append(time.monotonic() - start)
                if r.status_code != 200:
                    tally.bad.append(f"/health {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                tally.bad.append(f"/health failed: {e!r}")
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------- measurement
def rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (the engine process), MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total / 1024


def gauges(url: str) -> dict[str, float]:
    names = ("kubellm_num_requests_running", "kubellm_num_requests_waiting", "kubellm_kv_cache_usage_ratio")
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for name in names:
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def soak(url: str, port: int, minutes: float, seed: int) -> tuple[Tally, list[float]]:
    tally, latencies = Tally(), []
    until = time.monotonic() + minutes * 60
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(
            *(valid_traffic(client, url, tally, until, seed + i) for i in range(4)),
            *(abusive_traffic(client, url, port, tally, until, seed + 100 + i) for i in range(2)),
            overload_traffic(client, url, tally, until, seed + 200),
            health_poller(url, tally, until, latencies),
        )
    return tally, latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a tiny random model, made once)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from kubellm.runtime.process import free_port

    model = args.model
    if model is None:
        from kubellm.weights.tiny import make_tiny_model

        model = make_tiny_model(os.path.join(tempfile.gettempdir(), "kubellm-soak-tiny"), "llama")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    keys = [a for k in KEYS.values() for a in ("--api-key", k)]
    log = open(os.path.join(tempfile.gettempdir(), f"kubellm-soak-{port}.log"), "wb")
    cmd = [sys.executable, "-m", "kubellm.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen([*cmd, *SERVER_FLAGS, *keys], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(open(log.name).read()[-3000:])
                return 2
            time.sleep(0.3)
        rss_before = rss_mib(server.pid)
        start = time.monotonic()
        tally, latencies = asyncio.run(soak(url, port, args.minutes, args.seed))
        elapsed = time.monotonic() - start
        # in-flight work ends (aborted streams, the last bursts): the gauges must come back to 0
        settle = time.monotonic() + 60
        while any(gauges(url).values()) and time.monotonic() < settle:
            time.sleep(0.5)
        final = gauges(url)
        rss_after = rss_mib(server.pid)
        if any(final.values()):
            tally.bad.append(f"gauges not back to 0: {final}")
        with open(log.name, "rb") as f:
            logs = f.read().decode(errors="replace")
        errors = [line for line in logs.splitlines() if '"level": "error"' in line]
        if errors:
            tally.bad.append(f"{len(errors)} ERROR log lines, first: {errors[0][:300]}")
        report = {
            "minutes": round(elapsed / 60, 2),
            "requests_by_kind_and_status": {k: dict(sorted(v.items(), key=str)) for k, v in tally.by_kind.items()},
            "requests_total": sum(sum(v.values()) for v in tally.by_kind.values()),
            "health": {
                "probes": len(latencies),
                "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
                "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
                "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
            },
            "rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
            "gauges_at_end": final,
            "failures": tally.bad[:20],
            "num_failures": len(tally.bad),
        }
        print(json.dumps(report, indent=2))
        return 1 if tally.bad else 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
