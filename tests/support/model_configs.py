"""Published models' config.json fields (what kubellm/fit.py's estimate reads), for fit-check tests."""

from __future__ import annotations

LLAMA_3_1_8B = {  # meta-llama/Llama-3.1-8B's config.json
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
