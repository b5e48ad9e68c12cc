"""LoRA adapters on the decoder (PEFT format), many at once, mixed in one batch.

An adapter is a directory as PEFT's save_pretrained writes it: adapter_config.json (r, lora_alpha, use_rslora,
target_modules) and adapter_model.safetensors (`…layers.N.self_attn.q_proj.lora_A.weight` [r, in] and
`lora_B.weight` [out, r]), on any of q/k/v/o/gate/up/down. read_adapter checks it against the model and the
rank limit; LoraModel wraps the model's projections once and holds `max_loras` slots, each an adapter or empty.

Every batch row belongs to one slot (0: the base model). The runner sets the batch's rows before the forward
(set_rows): runs of consecutive rows (start, end, slot) with slot > 0, so rows of the base model cost nothing.
Each wrapped projection adds, per run, what PEFT adds: `lora_B(lora_A(x)) * scaling`, in the adapter's
dtype, onto the projection's output — the torch path, exact against HF + PEFT. With q/k/v and gate/up packed
into one matmul here, each packed part gets its own adapter pair. The runs are host data (a loop per run), so
decode steps with LoRA run eagerly, without CUDA graphs; a batched kernel for CUDA (punica/SGMV-style: one
launch over all rows, indexed by slot) would replace the loop without changing this interface.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

# HF projection name → (our module path inside a decoder layer, index of the packed part)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_WEIGHT_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

_ROWS: list[tuple[int, int, int]] = []  # the current batch's runs of adapter rows: (start, end, slot)


def set_rows(runs: list[tuple[int, int, int]]) -> None:
    global _ROWS
    _ROWS = runs


def runs_of(slots: list[int], lengths: list[int] | None = None) -> list[tuple[int, int, int]]:
    """(start, end, slot) runs of rows, one entry per batch item (`lengths` rows each, 1 by default), merged
    where consecutive items share a slot; slot 0 (the base model) left out."""
    runs: list[tuple[int, int, int]] = []
    row = 0
    for i, slot in enumerate(slots):
        n = 1 if lengths is None else lengths[i]
        if slot:
            if runs and runs[-1][1] == row and runs[-1][2] == slot:
                runs[-1] = (runs[-1][0], row + n, slot)
            else:
                runs.append((row, row + n, slot))
        row += n
    return runs


class LoraError(ValueError):
    """An adapter that cannot be served; `field` names the setting or request field at fault."""

    def __init__(self, message: str, field: str = "lora_path"):
        super().__init__(message)
        self.field = field


class LoraNotLoaded(LoraError):
    """The adapter named is not loaded (an API's 404)."""


@dataclass
class LoraAdapter:
    """An adapter read from disk: per (layer, HF projection name) its A [r, in] and B [out, r], and one scaling."""

    path: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_adapter(path: str, num_layers: int, max_rank: int) -> LoraAdapter:
    """Read a PEFT LoRA adapter; LoraError (naming the field) for what this engine cannot serve."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise LoraError(f"no adapter_config.json in {path!r} (a PEFT LoRA adapter directory is expected)")
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "bias": cfg.get("bias", "none") not in (None, "none"),
    }
    refused = [k for k, v in unsupported.items() if v]
    if refused:
        raise LoraError(f"{path}: adapters with {', '.join(refused)} are not supported")
    rank = int(cfg["r"])
    if rank > max_rank:
        raise LoraError(f"the adapter's rank is {rank}, more than --max-lora-rank {max_rank}", "max_lora_rank")
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    files = [n for n in ("adapter_model.safetensors",) if os.path.isfile(os.path.join(path, n))]
    if not files:
        raise LoraError(f"no adapter_model.safetensors in {path!r}")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(os.path.join(path, files[0]), framework="pt", device="cpu") as f:
        for name in f.keys():
            m = _WEIGHT_NAME.search(name)
            if m is None:
                raise LoraError(f"{path}: weight {name!r} is not a LoRA A/B of a supported projection")
            layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
            if proj not in TARGETS or layer >= num_layers:
                raise LoraError(f"{path}: {name!r} targets a module this model does not have")
            pairs.setdefault((layer, proj), {})[ab] = f.get_tensor(name)
    weights = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1] or ab["A"].shape[0] > max_rank:
            raise LoraError(
                f"{path}: layer {key[0]} {key[1]}: lora_A and lora_B do not form a pair of rank ≤ {max_rank}"
            )
        weights[key] = (ab["A"], ab["B"])
    if not weights:
        raise LoraError(f"{path}: the adapter has no LoRA weights")
    return LoraAdapter(path, rank, scaling, weights)


class LoraLinear(nn.Module):
    """A projection of the decoder plus, per slot, the LoRA pairs of its packed parts."""

    def __init__(self, base: nn.Module, part_sizes: list[int], max_loras: int):
        super().__init__()
        self.base = base
        self.offsets = [sum(part_sizes[:i]) for i in range(len(part_sizes))]
        self.sizes = part_sizes
        # slots[s][part]: (A, B, scaling) on the device, or None (the part has no adapter in slot s)
        self.slots: list[list[tuple[torch.Tensor, torch.Tensor, float] | None]] = [
            [None] * len(part_sizes) for _ in range(max_loras + 1)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for start, end, slot in _ROWS:
            for part, pair in enumerate(self.slots[slot]):
                if pair is None:
                    continue
                a, b, scaling = pair
                off = self.offsets[part]
                out = y[start:end, off : off + self.sizes[part]]
                # as PEFT: the input cast to the adapter's dtype, the sum in the wider type, cast back
                out.copy_(out + F.linear(F.linear(x[start:end].to(a.dtype), a), b) * scaling)
        return y


class LoraModel:
    """The decoder's projections wrapped for LoRA, and the adapters loaded into its slots 1 … max_loras."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        self.max_loras, self.max_rank = max_loras, max_rank
        self.num_layers = len(model.model.layers)
        self.device = next(model.parameters()).device
        # PEFT keeps adapter weights in float32 under a bf16/fp16 model (autocast_adapter_dtype) and computes
        # the LoRA term there: so do we, to give its outputs
        self.adapter_dtype = torch.float32
        self.modules: dict[tuple[int, str], LoraLinear] = {}  # (layer, our module path) → wrapper
        for i, layer in enumerate(model.model.layers):
            for path in dict.fromkeys(p for p, _ in TARGETS.values()):
                owner_name, _, leaf = path.rpartition(".")
                owner = layer.get_submodule(owner_name)
                base = getattr(owner, leaf, None)
                if base is None:  # e.g. an MoE layer has no dense gate_up_proj: no adapter there
                    continue
                sizes = list(getattr(base, "out_sizes", [base.weight.shape[0]]))
                wrapper = LoraLinear(base, sizes, max_loras)
                setattr(owner, leaf, wrapper)
                self.modules[(i, path)] = wrapper

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Put an adapter (read_adapter) into a slot, replacing what was there."""
        self.unload(slot)
        for (layer, proj), (a, b) in adapter.weights.items():
            path, part = TARGETS[proj]
            module = self.modules.get((layer, path))
            if module is None:
                raise LoraError(f"{adapter.path}: layer {layer} has no {proj} to adapt")
            in_features = module.base.weight.shape[1]
            if a.shape[1] != in_features or b.shape[0] != module.sizes[part]:
                raise LoraError(
                    f"{adapter.path}: layer {layer} {proj}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                    f"not fit a [{module.sizes[part]}, {in_features}] projection (another base model's adapter?)"
                )
        for (layer, proj), (a, b) in adapter.weights.items():
            path, part = TARGETS[proj]
            pair = (a.to(self.device, self.adapter_dtype), b.to(self.device, self.adapter_dtype), adapter.scaling)
            self.modules[(layer, path)].slots[slot][part] = pair

    def unload(self, slot: int) -> None:
        for module in self.modules.values():
            module.slots[slot] = [None] * len(module.sizes)
