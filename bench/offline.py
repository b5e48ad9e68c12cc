"""Offline throughput on nano-vllm's workload: 256 requests, prompt lengths U[100,1024], output lengths
U[100,1024], random token ids, EOS ignored, seed 0.

    python bench/offline.py --model DIR            # any model dir
    python bench/offline.py --shape qwen3-0.6b     # a random bf16 model of that shape (made once)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    args = ap.parse_args()

    from kubellm.runtime import LLM, SamplingParams

    model = args.model
    if args.shape:
        from bench.shapes import make_shaped_model

        model = make_shaped_model(os.path.join(args.cache_dir, f"{args.shape}-wordlevel"), args.shape)
    llm = LLM(model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager)
    vocab = llm.engine.vocab_size
    prompts, out_lens = workload(args.num_requests, *args.input_len, *args.output_len, vocab, args.seed)
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, detokenize=False) for n in out_lens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, detokenize=False))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == sum(out_lens)
    runner = llm.engine.runner
    print("| engine | model | device | requests | output tokens | time (s) | output tok/s | total tok/s | preemptions |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = generated + sum(map(len, prompts))
    print(f"| kubellm | {args.shape or os.path.basename(model)} ({runner.info.dtype}) | {runner.device} | "
          f"{len(prompts)} | {generated} | {elapsed:.2f} | {generated / elapsed:,.0f} | {total / elapsed:,.0f} | "
          f"{llm.engine.scheduler.num_preemptions} |")


if __name__ == "__main__":
    main()
