"""N-gram speculative decoding at concurrency 1 on a code-editing workload: each request gives a short Python
file and asks for it back with one change, so most of the answer is already in the prompt (what prompt lookup
exploits). Runs every request alone, without and then with --speculative-config, checks the outputs are the
same, and prints the inter-token latency, output tok/s and accepted tokens per step.

At --temperature > 0 every request carries a seed (--seed, one per request): a seeded request draws the same
tokens with and without speculation (engine/speculation.py), so both runs decode the same text and the
outputs are still checked equal.

    python bench/speculative.py                       # SmolLM2-135M-Instruct (the demo model), fp32, greedy
    python bench/speculative.py --temperature 0.7     # sampled (rejection sampling)
    python bench/speculative.py --model DIR --dtype bfloat16 --num-speculative-tokens 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

FILES = [
    '''def compute_total(prices, tax_rate):
    """Sum the prices and add the tax."""
    subtotal = 0
    for price in prices:
        subtotal += price
    tax = subtotal * tax_rate
    return subtotal + tax


def main():
    prices = [3.5, 2.25, 10.0, 7.75]
    total = compute_total(prices, 0.08)
    print(f"total: {total:.2f}")


if __name__ == "__main__":
    main()
''',
    """class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word):
        if word in self.counts:
            self.counts[word] += 1
        else:
            self.counts[word] = 1

    def most_common(self, n):
        items = sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)
        return items[:n]
""",
    """import os


def list_python_files(root):
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                found.append(os.path.join(directory, name))
    return sorted(found)


def count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)
""",
]
EDITS = [
    "Rename the function compute_total to total_with_tax everywhere.",
    "Rename the method add to add_word.",
    "Rename the function count_lines to line_count.",
]


def chat_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for code, edit in zip(FILES, EDITS):
        message = f"{edit} Reply with the whole file and nothing else.\n\n```python\n{code}```"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def run(llm, prompts, max_tokens: int, temperature: float, seed: int) -> tuple[list[list[int]], list[float]]:
    """Each prompt alone; (outputs, inter-token latency per request in seconds)."""
    from kubellm.runtime import SamplingParams

    outputs, itls = [], []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i if temperature else None)
        out = llm.generate([prompt], params)[0]
        end = time.monotonic()
        tokens = out.outputs[0].token_ids
        outputs.append(tokens)
        itls.append((end - out.first_token_time) / max(len(tokens) - 1, 1))
    return outputs, itls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the SmolLM2 demo model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: seeded sampling")
    ap.add_argument("--seed", type=int, default=0, help="request i's seed at temperature > 0: seed + i")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from kubellm.runtime import LLM

    model = args.model
    if model is None:
        from kubellm.weights.smollm2 import demo_model_dir

        model = demo_model_dir()
    prompts = chat_prompts(AutoTokenizer.from_pretrained(model))
    spec = json.dumps(
        {
            "method": "ngram",
            "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": args.prompt_lookup_max,
            "prompt_lookup_min": args.prompt_lookup_min,
        }
    )
    rows = []
    outputs = {}
    for name, config in (("plain", None), ("ngram", spec)):
        llm = LLM(model, dtype=args.dtype, speculative_config=config)
        run(llm, prompts[:1], 8, args.temperature, args.seed)  # warm-up
        before = llm.engine.core.stats.spec.num_accepted_tokens, llm.engine.core.stats.spec.num_drafts
        outputs[name], itls = run(llm, prompts, args.max_tokens, args.temperature, args.seed)
        s = llm.engine.core.stats.spec
        accepted, drafts = s.num_accepted_tokens - before[0], s.num_drafts - before[1]
        tokens = sum(len(o) for o in outputs[name])
        steps = tokens - accepted  # every step yields one token beyond the accepted draft tokens
        rows.append((name, tokens, statistics.mean(itls) * 1e3, tokens / steps, drafts, accepted))
        llm.engine.shutdown()
    assert outputs["plain"] == outputs["ngram"], "speculation changed the output"
    decoding = f"temperature {args.temperature}, seeds {args.seed}…" if args.temperature else "greedy"
    print(f"model {model} ({args.dtype}), {len(prompts)} code-editing requests one at a time, {decoding}, {spec}")
    print("| decoding | output tokens | mean ITL (ms) | tokens per step | drafts | accepted draft tokens |")
    print("|---|---|---|---|---|---|")
    for name, tokens, itl, per_step, drafts, accepted in rows:
        print(f"| {name} | {tokens} | {itl:.2f} | {per_step:.2f} | {drafts} | {accepted} |")
    print(f"ITL plain / ngram: {rows[0][2] / rows[1][2]:.2f}x; outputs identical")


if __name__ == "__main__":
    main()
