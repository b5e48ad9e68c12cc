"""What the engine tests run on: the tiny random-weight architectures (built by tests/conftest.py's
`tiny_models` fixture), random prompts over their vocabulary, and how many tokens to compare with HF."""

from __future__ import annotations

import random

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
LENGTHS = [1, 2, 5, 16, 17, 33, 64, 100, 150, 200, 256, 300]  # 12 prompts, lengths 1 … 300
NEW_TOKENS = 24


def random_prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 500) for _ in range(n)] for n in lengths]
