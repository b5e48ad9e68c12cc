"""FP8 weights' and FP8 KV cache's quality against the same model in bf16: greedy agreement and logprob drift.

Runs a set of chat questions greedily with the bf16 weights and with each FP8 variant, then scores the bf16
answers under each (prompt logprobs of prompt + answer, teacher-forced) to measure how far its log-probabilities
drift on the same tokens. Variants:
- fp8: `quantization="fp8"` on the reference path (each linear weight rounded to FP8 with one scale per output
  channel, as an FP8 checkpoint of that scheme holds it; bf16 activations): W8A16;
- fp8-w8a8: the same weights through FP8 matmuls, activations quantized per token (what Ada/Hopper GPUs run;
  forced here on any device, torch._scaled_mm runs on the CPU too);
- kv-fp8: bf16 weights, `kv_cache_dtype="fp8"` (keys and values stored in e4m3 with the checkpoint's per-layer
  scales, else 1.0). On the torch path it also reports the range of the keys and values the bf16 run writes: the
  share below e4m3's smallest normal (2^-6, where scale 1.0 loses precision) and above 448 (where it saturates).

    python bench/fp8_quality.py                  # SmolLM2-135M-Instruct, the real demo weights
    python bench/fp8_quality.py --model DIR --max-tokens 128 --variants fp8-w8a8
    python bench/fp8_quality.py --variants kv-fp8
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kubellm.runtime.model import fp8

# name → (LLM keyword arguments, FP8 matmuls)
VARIANTS = {"bf16": ({}, False), "fp8": ({"quantization": "fp8"}, False), "fp8-w8a8": ({"quantization": "fp8"}, True)}
VARIANTS["kv-fp8"] = ({"kv_cache_dtype": "fp8"}, False)

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a Python function that reverses a string.",
    "Explain what a Kubernetes pod is in two sentences.",
    "What is 12 times 13?",
    "Give me a haiku about the sea.",
    "List the planets of the solar system.",
    "What does HTTP stand for?",
    "Translate 'good morning' into French and Spanish.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What is a prime number? Give two examples.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the SmolLM2 demo model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--variants", nargs="+", choices=sorted(set(VARIANTS) - {"bf16"}), default=["fp8", "fp8-w8a8"])
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from kubellm.runtime import LLM, SamplingParams

    model = args.model
    if model is None:
        from kubellm.weights.smollm2 import demo_model_dir

        model = demo_model_dir()
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, detokenize=False)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    answers, scores = {}, {}
    kv_range = record_kv_range() if "kv-fp8" in args.variants else None
    capable = fp8.matmuls_supported
    for name in ["bf16", *args.variants]:
        kwargs, matmuls = VARIANTS[name]
        fp8.matmuls_supported = (lambda device, dtype: dtype == torch.bfloat16) if matmuls else (lambda *_: False)
        llm = LLM(model, dtype="bfloat16", enable_prefix_caching=False, **kwargs)
        fp8.matmuls_supported = capable
        answers[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        teacher = [p + a for p, a in zip(prompts, answers["bf16"])]
        outs = llm.generate(teacher, score)
        # the answer tokens' logprobs (prompt_logprobs entry k scores token k + 1)
        scores[name] = [
            [lp.logprob for lp in o.prompt_logprobs[len(p) - 1 :]] for o, p in zip(outs, prompts, strict=True)
        ]
        llm.engine.shutdown()
    tokens = sum(len(a) for a in answers["bf16"])
    print(f"model {model}, {len(prompts)} chat questions, greedy, up to {args.max_tokens} tokens, against bf16")
    print(f"| measure | {' | '.join(args.variants)} |")
    print(f"|---|{'---|' * len(args.variants)}")
    rows: dict[str, list[str]] = {}
    for name in args.variants:
        identical = sum(a == b for a, b in zip(answers["bf16"], answers[name]))
        prefix = []
        for a, b in zip(answers["bf16"], answers[name]):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefix.append(n / max(len(a), 1))
        drift = [abs(x - y) for a, b in zip(scores["bf16"], scores[name]) for x, y in zip(a, b)]
        p99 = sorted(drift)[int(0.99 * (len(drift) - 1))]
        for measure, value in (
            ("identical greedy answers", f"{identical} / {len(prompts)}"),
            ("agreeing prefix (share of the bf16 answer, mean)", f"{statistics.mean(prefix):.1%}"),
            ("teacher-forced tokens scored", f"{len(drift)} (of {tokens})"),
            ("logprob drift, mean abs (nats)", f"{statistics.mean(drift):.4f}"),
            ("logprob drift, p99 / max abs (nats)", f"{p99:.4f} / {max(drift):.4f}"),
        ):
            rows.setdefault(measure, []).append(value)
    for measure, values in rows.items():
        print(f"| {measure} | {' | '.join(values)} |")
    for kind, r in (kv_range or {}).items():
        if r["count"]:  # the torch path's writes (the Triton path writes inside its fused kernel)
            print(
                f"{kind} written by the bf16 run: {r['count']:,} values, max abs {r['max']:.1f}, "
                f"{r['small'] / r['count']:.2%} below 2^-6, {r['large'] / r['count']:.4%} above 448"
            )


def record_kv_range() -> dict:
    """Wrap the decoder's write_kv to count the magnitudes of the keys and values an unquantized cache receives."""
    from kubellm.runtime.model import decoder

    stats = {kind: {"max": 0.0, "small": 0, "large": 0, "count": 0} for kind in ("K", "V")}
    write = decoder.write_kv

    def counting_write(k, v, k_cache, *rest):
        if k_cache.element_size() > 1:  # the unquantized run
            for kind, x in (("K", k), ("V", v)):
                a, s = x.float().abs(), stats[kind]
                s["max"] = max(s["max"], a.max().item())
                s["small"] += int((a < 2**-6).sum())
                s["large"] += int((a > 448).sum())
                s["count"] += a.numel()
        write(k, v, k_cache, *rest)

    decoder.write_kv = counting_write
    return stats


if __name__ == "__main__":
    main()
