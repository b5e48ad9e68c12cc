"""Loader: config.json + safetensors (single file or sharded with an index) + tokenizer → our decoder."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from kubellm.runtime.model import fp8
from kubellm.runtime.model.decoder import DecoderForCausalLM, ModelShape
from kubellm.runtime.model.moe import EXPERT_WEIGHT
from kubellm.runtime.model.sharded import load_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a layer's KV-cache scales, as FP8-KV checkpoints name them (vLLM reads the same): self_attn.k_scale / v_scale
# (llm-compressor's kv_cache_scheme, HF), k_proj/v_proj.output_scale (older compressed-tensors), kv_scale (both)
KV_SCALE = re.compile(
    r"(model\.layers\.\d+\.self_attn)\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)$"
)


@dataclass
class ModelInfo:
    hf_config: object
    shape: ModelShape
    dtype: torch.dtype
    eos_token_ids: list[int]


def read_model_info(model_dir: str, dtype: str = "auto") -> ModelInfo:
    from transformers import AutoConfig, GenerationConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    shape = ModelShape.from_hf(hf_config)
    if dtype == "auto":
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        torch_dtype = DTYPES[config_dtype] if isinstance(config_dtype, str) else config_dtype
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    eos: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    if os.path.exists(os.path.join(model_dir, "generation_config.json")):
        sources.insert(0, GenerationConfig.from_pretrained(model_dir).eos_token_id)
    for ids in sources:
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos:
                eos.append(int(i))
    return ModelInfo(hf_config, shape, torch_dtype, eos)


def _safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return [os.path.join(model_dir, f) for f in files]


def load_model(
    model_dir: str,
    info: ModelInfo,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
    load_format: str = "auto",
) -> DecoderForCausalLM:
    """quantization "fp8": quantize the linear weights of a bf16/fp32 checkpoint to FP8 (fp8.py); FP8 checkpoints
    are recognized by their quantization_config whatever it says. Either runs its dense projections as FP8
    matmuls where the device has them (fp8.matmuls_supported), else holds them dequantized. load_format "dummy":
    no checkpoint, random weights (seeded; norms 1) — for benchmarking shapes whose checkpoint would not fit the
    disk."""
    with torch.device("meta"):
        meta_model = DecoderForCausalLM(info.shape, info.hf_config, max_positions)
    model = meta_model.to_empty(device=device).to(info.dtype)
    # buffers (rotary cos/sin) were on meta: rebuild them for real
    model.model.rotary.__init__(info.hf_config, info.shape.head_dim, max_positions)
    model.model.rotary.to(device)
    if info.shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    checkpoint_fp8 = None if load_format == "dummy" else fp8.Fp8Checkpoint.from_hf(info.hf_config)
    fp8_matmuls = (quantization == "fp8" or checkpoint_fp8 is not None) and fp8.matmuls_supported(device, info.dtype)
    if load_format == "dummy":
        _random_weights(model)
        if fp8_matmuls:
            fp8.hold_projections_in_fp8(model, quantize=True)
            torch.cuda.empty_cache()  # the bf16 copies: the KV budget reads the driver's free memory
        return model.eval()
    if fp8_matmuls:  # before reading: the projections' FP8 values and scales are read into place
        fp8.hold_projections_in_fp8(model, quantize=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    with contextlib.ExitStack() as stack:
        files = {
            path: stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            for path in _safetensors_files(model_dir)
        }
        where = {name: f for f in files.values() for name in f.keys()}
        for name, f in where.items():
            kv_scale = KV_SCALE.match(name)
            if kv_scale:
                _set_kv_scale(model.get_submodule(kv_scale[1]), kv_scale[2], f.get_tensor(name))
                continue
            if "rotary_emb" in name or name.endswith(fp8.SCALE_SUFFIXES):
                continue
            if name == "lm_head.weight" and info.shape.tie_word_embeddings:
                continue
            weight = f.get_slice(name)  # read lazily: each tensor-parallel rank reads only its part
            if weight.get_dtype() == "F8_E4M3":
                weight = _fp8_weight(name, f, where, checkpoint_fp8, info.dtype)
            _load_tensor(model, params, loaded, name, weight)
    if quantization == "fp8" and checkpoint_fp8 is None and not fp8_matmuls:
        with torch.no_grad():
            for name, param in params.items():
                if name.endswith(fp8.QUANTIZED_LEAVES):
                    param.data.copy_(fp8.round_to_fp8(param.data))
    _check_complete(model, loaded, info.shape)
    return model.eval()


def _set_kv_scale(attention, kind: str, value: torch.Tensor) -> None:
    """A layer's scale for an FP8 KV cache (used only when the cache is FP8: attention.py)."""
    if value.numel() != 1:
        raise ValueError(f"KV-cache scale {kind} must be one value per layer, got shape {tuple(value.shape)}")
    scale = float(value.float().item())
    if not scale > 0:
        raise ValueError(f"KV-cache scale {kind} must be positive, got {scale}")
    if kind in ("k_scale", "kv_scale", "k_proj.output_scale"):
        attention.k_scale = scale
    if kind in ("v_scale", "kv_scale", "v_proj.output_scale"):
        attention.v_scale = scale


@torch.no_grad()
def _random_weights(model: DecoderForCausalLM) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def _fp8_weight(name: str, f, where: dict, scheme: fp8.Fp8Checkpoint | None, dtype: torch.dtype) -> fp8.Fp8Weight:
    if scheme is None:
        raise ValueError(f"{name} is FP8 but config.json has no quantization_config")
    base = name.removesuffix(".weight")
    scale_name = f"{base}.weight_scale_inv" if scheme.method == "fp8" else f"{base}.weight_scale"
    if scale_name not in where:
        raise ValueError(f"FP8 weight {name} has no {scale_name} in the checkpoint")
    return fp8.Fp8Weight(f.get_tensor(name), where[scale_name].get_tensor(scale_name), scheme.block, dtype)


def _copy(module, param: torch.Tensor, weight, dim: int | None, shard=None) -> None:
    """One checkpoint tensor into `param` (or one packed shard of it), this rank's part: into an FP8 projection
    as FP8 values and per-row scales (quantized here from a bf16/fp32 checkpoint), else as it is."""
    part = (lambda t: module.shard(t, shard)) if shard is not None else (lambda t: t)
    if param.dtype != fp8.FP8:
        load_shard(part(param), weight, dim)
        return
    q, scale = weight.per_row() if isinstance(weight, fp8.Fp8Weight) else fp8.quantize_per_channel(weight[:])
    load_shard(part(param), fp8.DenseSlice(q), dim)
    rows = module.weight_scale.view(-1, 1)  # [1, out] held, one scale per output row
    load_shard(part(rows), fp8.DenseSlice(scale), 0 if dim == 0 else None)


def _load_tensor(model: DecoderForCausalLM, params: dict, loaded: set[str], name: str, weight) -> None:
    """One checkpoint tensor (a safetensors slice, or a DenseSlice) into its parameter (or packed shard)."""
    expert = EXPERT_WEIGHT.match(name)
    if expert:  # one expert's projection, into the layer's stacked expert weights
        experts = f"{expert[1]}.mlp.experts"
        loaded.add(f"{experts}.{model.get_submodule(experts).load_expert(weight, int(expert[2]), expert[3])}")
        return
    name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's router
    module_name, _, leaf = name.rpartition(".")
    parent, _, proj = module_name.rpartition(".")
    if proj in DecoderForCausalLM.packed_modules:
        packed, shard = DecoderForCausalLM.packed_modules[proj]
        target_name = f"{parent}.{packed}.{leaf}"
        _copy(model.get_submodule(f"{parent}.{packed}"), params[target_name].data, weight, 0, shard)
        loaded.add(f"{target_name}#{shard}")
        return
    if name not in params:
        raise ValueError(f"unexpected weight {name!r} in the checkpoint")
    # with tensor parallelism, a sharded module takes this rank's slice (its tp_dim)
    module = model.get_submodule(module_name)
    _copy(module, params[name].data, weight, getattr(module, "tp_dim", None))
    loaded.add(name)


def _check_complete(model: DecoderForCausalLM, loaded: set[str], shape: ModelShape) -> None:
    missing = []
    for name, module in model.named_modules():
        if hasattr(module, "checkpoint_keys"):  # stacked experts, loaded one expert's projection at a time
            missing += sorted(f"{name}.{k}" for k in module.checkpoint_keys() if f"{name}.{k}" not in loaded)
            continue
        for leaf, _ in module.named_parameters(recurse=False):
            full = f"{name}.{leaf}" if name else leaf
            if hasattr(module, "out_sizes"):
                if leaf == "bias" and not shape.attention_bias:
                    continue
                missing += [f"{full}#{i}" for i in range(len(module.out_sizes)) if f"{full}#{i}" not in loaded]
            elif full not in loaded and not (full == "lm_head.weight" and shape.tie_word_embeddings):
                missing.append(full)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}")
