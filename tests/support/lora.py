"""LoRA adapters for the tests, made with PEFT itself (its save_pretrained is the format the engine reads), with
random B matrices: PEFT initialises B to zero, which would make every adapter a no-op; and HF transformers +
PEFT as the reference for greedy outputs under an adapter."""

from __future__ import annotations

import torch

from tests.support.hf_reference import generate_greedy

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def make_adapter(
    model_dir: str,
    out_dir: str,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ALL_TARGETS,
    use_rslora: bool = False,
    seed: int = 0,
    scale: float = 0.5,
) -> str:
    """A PEFT LoRA adapter of the model in model_dir, saved to out_dir; A and B drawn from N(0, scale²/fan-in)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=gen) * scale / fan_in**0.5)
    model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(model_dir: str, adapter_dir: str | None, prompts: list[list[int]], max_new_tokens: int) -> list:
    """Greedy continuations from HF transformers with the adapter applied by PEFT (None: the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return generate_greedy(model, prompts, max_new_tokens)
