"""Random-weight models with the shapes of real checkpoints (for benchmarks; no download needed)."""

from __future__ import annotations

import os

SHAPES = {
    # Qwen/Qwen3-0.6B config.json
    "qwen3-0.6b": dict(
        arch="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": dict(
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # meta-llama/Llama-3.1-8B config.json (16 GB in bf16: made on the device, --load-format dummy)
    "llama-3.1-8b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    # Qwen/Qwen3-30B-A3B config.json: 48 layers, each a mixture of 128 experts (top 8, renormalized), ~30.5B
    # parameters (61 GB in bf16), ~3.3B of them active per token. At a decode batch of 256 every expert is
    # chosen by some row (256 × 8 picks of 128), so a step reads all weights: the floor counts them all.
    "qwen3-30b-a3b": dict(
        arch="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    # Qwen3-0.6B's vocabulary and config on a tiny body: for bench/stand_in.py, which never runs the model
    "qwen3-tiny": dict(
        arch="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}


def word_level_tokenizer(vocab_size: int):
    """One word per id (`<t123>`), so every id the random model samples decodes to visible text: streamed
    benchmarks then see one event per token, as with a real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", eos_token="<t2>", pad_token="<t3>")


def make_shaped_model(out_dir: str, shape: str, dtype: str = "bfloat16", weights: bool = True) -> str:
    """Write a random model of the given shape, with a word-level tokenizer covering its whole vocabulary.
    weights False: config.json and the tokenizer only (the engine's load_format="dummy" makes the weights on
    the device: Qwen3-30B-A3B's 61 GB would neither fit the GPU machine's disk nor be written in minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    rope_theta = spec.pop("rope_theta")
    spec.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    cls = {"qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig, "llama": LlamaConfig}[arch]
    cfg = cls(**spec, eos_token_id=2, pad_token_id=3, bos_token_id=None)
    if not weights:
        cfg.dtype = dtype
        cfg.save_pretrained(out_dir)
        word_level_tokenizer(cfg.vocab_size).save_pretrained(out_dir)
        return out_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    word_level_tokenizer(cfg.vocab_size).save_pretrained(out_dir)
    return out_dir
