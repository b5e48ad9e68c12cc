"""FP8 KV-cache fixtures: a copy of a tiny model with per-layer KV-cache scales in its checkpoint, named as
llm-compressor's kv_cache_scheme writes them (model.layers.N.self_attn.k_scale / v_scale)."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def layer_scales(num_layers: int) -> list[tuple[float, float]]:
    """Powers of two (exact in any float format) that differ per layer and between K and V, none of them 1:
    a scale dropped on write or on read, or one layer's taken for another's, changes the values."""
    return [(2.0 ** -(1 + layer % 3), 2.0 ** (1 + layer % 2)) for layer in range(num_layers)]


def with_kv_scales(src: str, dst: str) -> list[tuple[float, float]]:
    """Copy the model at src to dst, its checkpoint with one k_scale and v_scale per layer; returns them."""
    shutil.copytree(src, dst)
    with open(os.path.join(src, "config.json")) as f:
        num_layers = json.load(f)["num_hidden_layers"]
    scales = layer_scales(num_layers)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    for layer, (k_scale, v_scale) in enumerate(scales):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k_scale)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v_scale)
    save_file(tensors, path, metadata={"format": "pt"})
    return scales
