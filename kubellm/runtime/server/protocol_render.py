"""The body the render endpoints answer with: vLLM's GenerateRequest (its disaggregated-serving "tokens in"
request), which is what the llm-d router's token producer parses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kubellm.runtime.server.protocol import StreamOptions


class RenderedRequest(BaseModel):
    request_id: str
    token_ids: list[int]  # the prompt as the engine would receive it
    features: dict[str, Any] | None = None  # multimodal placeholders: always None (text-only models)
    sampling_params: dict[str, Any]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None
    priority: int = 0
    kv_transfer_params: dict[str, Any] | None = None
