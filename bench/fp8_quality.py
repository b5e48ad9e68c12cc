"""FP8 weights' quality against the same model in bf16: greedy agreement and logprob drift.

Runs a set of chat questions greedily with the bf16 weights and with `quantization="fp8"` (each linear weight
rounded to FP8 with one scale per output channel, as an FP8 checkpoint of that scheme holds it), then scores the
bf16 answers under both (prompt logprobs of prompt + answer, teacher-forced) to measure how far the FP8 model's
log-probabilities drift on the same tokens.

    python bench/fp8_quality.py                  # SmolLM2-135M-Instruct, the real demo weights
    python bench/fp8_quality.py --model DIR --max-tokens 128
"""

from __future__ import annotations

import argparse
import statistics

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
    for name, quantization in (("bf16", None), ("fp8", "fp8")):
        llm = LLM(model, dtype="bfloat16", quantization=quantization, enable_prefix_caching=False)
        answers[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        teacher = [p + a for p, a in zip(prompts, answers["bf16"])]
        outs = llm.generate(teacher, score)
        # the answer tokens' logprobs (prompt_logprobs entry k scores token k + 1)
        scores[name] = [
            [lp.logprob for lp in o.prompt_logprobs[len(p) - 1 :]] for o, p in zip(outs, prompts, strict=True)
        ]
        llm.engine.shutdown()
    identical = sum(a == b for a, b in zip(answers["bf16"], answers["fp8"]))
    prefix = []
    for a, b in zip(answers["bf16"], answers["fp8"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    drift = [abs(x - y) for a, b in zip(scores["bf16"], scores["fp8"]) for x, y in zip(a, b)]
    tokens = sum(len(a) for a in answers["bf16"])
    print(f"model {model}, {len(prompts)} chat questions, greedy, up to {args.max_tokens} tokens, bf16 vs fp8 weights")
    print("| measure | value |")
    print("|---|---|")
    print(f"| identical greedy answers | {identical} / {len(prompts)} |")
    print(f"| agreeing prefix (share of the bf16 answer, mean) | {statistics.mean(prefix):.1%} |")
    print(f"| teacher-forced tokens scored | {len(drift)} (of {tokens}) |")
    print(f"| logprob drift, mean abs (nats) | {statistics.mean(drift):.4f} |")
    p99 = sorted(drift)[int(0.99 * (len(drift) - 1))]
    print(f"| logprob drift, p99 / max abs (nats) | {p99:.4f} / {max(drift):.4f} |")


if __name__ == "__main__":
    main()
