"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: LoRA adapters loaded and unloaded while serving.
Registered only with --allow-runtime-lora-updating (and --enable-lora): an adapter is code-adjacent input the
operator chooses, not something any API caller should swap; with --admin-key-file only that key may call them (the
operator's, kubellm/operator/adapters.py)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import PlainTextResponse

from kubellm.runtime.engine.async_engine import EngineDeadError, LoraOpError
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.errors import ApiError, retry_after
from kubellm.runtime.server.serving import Serving


class LoraAdapters:
    def __init__(self, serving: Serving):
        self.s = serving

    async def load(self, request: Request):
        s = self.s
        req: p.LoadLoraAdapterRequest = await s.admission.admit(
            request, p.LoadLoraAdapterRequest, shed_load=False, admin_only=True
        )
        if req.lora_name == s.model_name:
            raise ApiError(400, f"lora_name {req.lora_name!r} is the served model's name", param="lora_name")
        await self._run(s.engine.load_lora(req.lora_name, req.lora_path))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload(self, request: Request):
        s = self.s
        req: p.UnloadLoraAdapterRequest = await s.admission.admit(
            request, p.UnloadLoraAdapterRequest, shed_load=False, admin_only=True
        )
        await self._run(s.engine.unload_lora(req.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @staticmethod
    async def _run(op) -> None:
        try:
            await op
        except LoraOpError as e:  # the limits, a name in use or unknown, an unreadable adapter
            field = e.field or "lora_name"
            if e.not_loaded:
                raise ApiError(404, f"{field}: {e}", "not_found_error", param=field) from None
            raise ApiError(400, f"{field}: {e}", param=field) from None
        except EngineDeadError as e:
            raise ApiError(503, str(e), "service_unavailable", headers=retry_after(5)) from None
