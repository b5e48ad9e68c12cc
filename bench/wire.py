"""The per-step cost of the engine-core → server message (engine/wire.py): one StepOutput of N running
requests encoded in the engine process and decoded in the server's, against the positional tuples pickled
before the typed wire (the format at commit 42218d7, rebuilt here). Best of several rounds, so a loaded machine
measures the code, not its neighbours.

    .venv/bin/python bench/wire.py [--requests 256] [--logprobs 0]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kubellm.runtime.engine import wire  # noqa: E402


def typed_step(n: int, logprobs: int) -> wire.StepOutput:
    def lp(i):  # each token's own objects (a shared one would flatter pickle's memo)
        return [wire.TokenLogprob(i, -0.5 - i, [(i + k, -0.1 * k - i) for k in range(logprobs)])] if logprobs else None

    deltas = [
        wire.RequestDelta(f"req-{i:032x}", False, 0, 1.0, 2.0, [wire.CompletionDelta(0, [1000 + i], lp(i), None, None)])
        for i in range(n)
    ]
    return wire.StepOutput(deltas, [], wire.EngineSnapshot(n, 0, 0.5, 10, 5, 0, 100, 1000, None), n)


def tuple_step(n: int, logprobs: int):
    """42218d7's message: a StepMessage dataclass of (request_id, finished, cached, scheduled, first, outs) with
    outs = [(index, token ids, text, logprobs, finish_reason, stop_reason)], TokenLogprob a slots dataclass."""
    from dataclasses import dataclass

    @dataclass(slots=True)
    class TokenLogprob:
        token_id: int
        logprob: float
        top: list

    globals()["TokenLogprob"] = TokenLogprob  # picklable by name
    TokenLogprob.__qualname__ = "TokenLogprob"

    def lp(i):
        return [TokenLogprob(i, -0.5 - i, [(i + k, -0.1 * k - i) for k in range(logprobs)])] if logprobs else None

    deltas = [(f"req-{i:032x}", False, 0, 1.0, 2.0, [(0, [1000 + i], "", lp(i), None, None)]) for i in range(n)]
    return (deltas, [], (n, 0, 0.5, 10, 5, 0, 100, 1000, None), n)


def best_us(fn, rounds: int = 15, number: int = 200) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--logprobs", type=int, default=0, help="top logprobs per token (0: none asked)")
    args = ap.parse_args()
    typed = typed_step(args.requests, args.logprobs)
    data = wire.encode(typed)
    old = tuple_step(args.requests, args.logprobs)
    pickled = pickle.dumps(old, pickle.HIGHEST_PROTOCOL)
    rows = [
        ("typed (msgspec)", best_us(lambda: wire.encode(typed)), best_us(lambda: wire.decode_from_core(data)), data),
        (
            "tuples (pickle)",
            best_us(lambda: pickle.dumps(old, pickle.HIGHEST_PROTOCOL)),
            best_us(lambda: pickle.loads(pickled)),
            pickled,
        ),
    ]
    print(f"one step of {args.requests} running requests, logprobs={args.logprobs}")
    print(f"{'format':<18}{'encode µs':>11}{'decode µs':>11}{'total µs':>10}{'bytes':>8}")
    for name, enc, dec, blob in rows:
        print(f"{name:<18}{enc:>11.1f}{dec:>11.1f}{enc + dec:>10.1f}{len(blob):>8}")


if __name__ == "__main__":
    main()
