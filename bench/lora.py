"""What LoRA costs the engine: the same offline workload on a model served without LoRA, with LoRA on but every
request on the base model, and with requests spread over N adapters (all in the same batches). Adapters are
random PEFT-format ones of rank R on all seven projections, written here (no PEFT needed).

    python bench/lora.py --model DIR [--adapters 2 --rank 16 --num-requests 64 --input-len 128 --output-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model_dir: str, out_dir: str, rank: int, seed: int) -> str:
    """A PEFT-format LoRA adapter with random A and B on every projection of every layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    q, h, inter = cfg.num_attention_heads * head_dim, cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    shapes |= {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for proj, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if proj in TARGETS[:4] else "mlp"
            name = f"base_model.model.model.layers.{layer}.{part}.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) / rank**0.5
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGETS)}, f)
    return out_dir


def run(model: str, prompts, params, engine_options: dict, loras) -> float:
    from kubellm.runtime import LLM

    llm = LLM(model, **engine_options)
    llm.generate(prompts[:2], params, lora=loras[:2] if isinstance(loras, list) else loras)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, lora=loras)
    elapsed = time.perf_counter() - start
    llm.engine.shutdown()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    from kubellm.runtime import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    tokens = args.num_requests * args.output_len
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(args.adapters)]
        modules = [f"{n}={write_adapter(args.model, os.path.join(tmp, n), args.rank, i)}" for i, n in enumerate(names)]
        lora = {"enable_lora": True, "max_loras": args.adapters, "max_lora_rank": args.rank, "lora_modules": modules}
        mixed = [([None] + names)[i % (args.adapters + 1)] for i in range(args.num_requests)]
        runs = {
            "no LoRA": run(args.model, prompts, params, {"device": args.device}, None),
            "LoRA on, base only": run(args.model, prompts, params, {"device": args.device, **lora}, None),
            f"base + {args.adapters} adapters mixed": run(
                args.model, prompts, params, {"device": args.device, **lora}, mixed
            ),
        }
    for what, seconds in runs.items():
        print(f"{what:32s} {seconds:7.2f} s  {tokens / seconds:8.1f} output tok/s")


if __name__ == "__main__":
    main()
