"""The engine core's LoRA adapters: names → device slots (model/lora.py holds the weights), the limits
(--max-loras adapters loaded at once, --max-lora-rank), and which adapters the running and waiting sequences
use (vllm:lora_requests_info).

Each load gets a new id, never reused: a sequence's prefix-cache hashes start from it (block_manager.py), so
KV computed under one adapter is never a hit for the base model, another adapter, or a later adapter loaded
under the same name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kubellm.runtime.model.lora import LoraError, LoraModel, LoraNotLoaded, read_adapter

_load_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    name: str
    path: str
    slot: int
    load_id: int
    rank: int


class LoraManager:
    def __init__(self, lora_model: LoraModel):
        self.model = lora_model
        self.adapters: dict[str, LoadedAdapter] = {}
        self.by_slot: dict[int, LoadedAdapter] = {}

    @property
    def max_loras(self) -> int:
        return self.model.max_loras

    def get(self, name: str) -> LoadedAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise LoraNotLoaded(f"the LoRA adapter {name!r} is not loaded", "model")
        return adapter

    def load(self, name: str, path: str) -> LoadedAdapter:
        """Read and place an adapter; LoraError naming the field (lora_name, max_loras, max_lora_rank,
        lora_path) when it cannot be."""
        if not name:
            raise LoraError("lora_name must not be empty", "lora_name")
        if name in self.adapters:
            raise LoraError(f"a LoRA adapter named {name!r} is already loaded", "lora_name")
        free = [s for s in range(1, self.max_loras + 1) if s not in self.by_slot]
        if not free:
            raise LoraError(
                f"{self.max_loras} LoRA adapter(s) are loaded already, the most --max-loras allows; unload one first",
                "max_loras",
            )
        adapter = read_adapter(path, self.model.num_layers, self.model.max_rank)
        self.model.load(free[0], adapter)
        loaded = LoadedAdapter(name, path, free[0], next(_load_ids), adapter.rank)
        self.adapters[name] = self.by_slot[loaded.slot] = loaded
        return loaded

    def unload(self, name: str, in_use: int) -> None:
        """Free an adapter's slot; refused while `in_use` unfinished sequences still run on it."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise LoraNotLoaded(f"the LoRA adapter {name!r} is not loaded", "lora_name")
        if in_use:
            raise LoraError(
                f"the LoRA adapter {name!r} is in use by {in_use} sequence(s); unload it when they finish", "lora_name"
            )
        self.model.unload(adapter.slot)
        del self.adapters[name], self.by_slot[adapter.slot]

    def names(self, slots) -> list[str]:
        """The adapters' names of these slots (0, the base model, left out), sorted, once each."""
        return sorted({self.by_slot[s].name for s in slots if s in self.by_slot})
