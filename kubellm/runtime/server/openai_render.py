"""vLLM's render endpoints, POST /v1/chat/completions/render and /v1/completions/render: the request a chat or
completions call would run, without running it — above all its prompt token ids (the llm-d router's
`token-producer` reads `token_ids` to match prefixes exactly). They are built by the same code as the real
calls (ChatCompletions.submissions, Completions.submissions: chat template, tokenization, truncation, checks),
so the ids are the ones the engine would be given. Answered in vLLM's GenerateRequest shape: one object for
chat, a list (one per prompt) for completions; `sampling_params` holds this engine's own parameters."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fastapi import Request

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.openai_chat import ChatCompletions
from kubellm.runtime.server.openai_completions import Completions
from kubellm.runtime.server.protocol_render import RenderedRequest

if TYPE_CHECKING:
    from kubellm.runtime.engine.intake import Submission


class Render:
    def __init__(self, chat: ChatCompletions, completions: Completions):
        self.chat, self.completions = chat, completions
        self.s = chat.s

    async def chat_completion(self, request: Request):
        # admitted like /tokenize (API key, body, schema, model name) but never shed: nothing queues
        req: p.ChatCompletionRequest = await self.s.admission.admit(request, p.ChatCompletionRequest, shed_load=False)
        (submission,) = await self.chat.submissions(req)
        return rendered(submission, f"chatcmpl-{request.state.request_id}", req).model_dump()

    async def completion(self, request: Request):
        req: p.CompletionRequest = await self.s.admission.admit(request, p.CompletionRequest, shed_load=False)
        submissions, _ = await self.completions.submissions(req)
        rid = f"cmpl-{request.state.request_id}"
        return [
            rendered(sub, rid if len(submissions) == 1 else f"{rid}-{i}", req).model_dump()
            for i, sub in enumerate(submissions)
        ]


def rendered(submission: Submission, request_id: str, req: p.SamplingFields) -> RenderedRequest:
    salt = (req.model_extra or {}).get("cache_salt")
    return RenderedRequest(
        request_id=request_id,
        token_ids=list(submission.prompt_token_ids),
        sampling_params=dataclasses.asdict(submission.params),
        model=req.model,
        stream=req.stream,
        stream_options=req.stream_options if req.stream else None,
        cache_salt=salt if isinstance(salt, str) else None,
        priority=req.priority,
    )
