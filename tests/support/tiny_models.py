"""What the engine tests run on: the tiny random-weight architectures (built by tests/conftest.py's
`tiny_models` fixture), random prompts over their vocabulary, and how many tokens to compare with HF."""

from __future__ import annotations

import os
import random

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
LENGTHS = [1, 2, 5, 16, 17, 33, 64, 100, 150, 200, 256, 300]  # 12 prompts, lengths 1 … 300
NEW_TOKENS = 24


def random_prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 500) for _ in range(n)] for n in lengths]


def looping_model(src: str, dst: str, attention_scale: float = 0.02) -> str:
    """A copy of a tiny model whose attention output is scaled down: each next token then depends mostly on the
    current one, so greedy output falls into cycles (what n-gram speculation finds) while the context still
    moves some choices (a wrong KV entry still shows)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(attention_scale)
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(src, name), dst)
    return dst


def bigram_model(src: str, dst: str, support: list[int], logits: list[list[float]]) -> str:
    """A copy of a tiny Llama whose next token depends on the current token only, with known logits: every
    attention and MLP output is zero (the residual stream is the token's embedding), token support[j]'s
    embedding is the unit vector e_j, any other token's e_S (S = len(support)), and the LM head maps e_j to
    logits[j] over the support tokens (logits has S + 1 rows of S) and -40 for every other token. Its output
    stays within the support and revisits the same few tokens: n-gram drafts on every step."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    size = len(support)
    assert len(logits) == size + 1 and all(len(row) == size for row in logits)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.config.hidden_size
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, size] = 1.0
        embed[support] = 0.0
        embed[support, list(range(size))] = 1.0
        model.model.norm.weight.fill_(1.0)
        # RMSNorm turns e_j into sqrt(hidden) * e_j (up to its epsilon)
        head = torch.full_like(model.lm_head.weight, -40.0 / hidden**0.5)
        head[support, : size + 1] = torch.tensor(logits).T / hidden**0.5
        model.lm_head.weight.copy_(head)
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(src, name), dst)
    return dst
