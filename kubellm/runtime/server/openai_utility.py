"""The OpenAI/vLLM endpoints that generate nothing: GET /v1/models, POST /tokenize and POST /detokenize (admitted
like the others, but never shed: they do not queue in the engine)."""

from __future__ import annotations

import time

from fastapi import Request

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.errors import ApiError
from kubellm.runtime.server.serving import Serving


class Utility:
    def __init__(self, serving: Serving):
        self.s = serving
        self.created = int(time.time())

    async def list_models(self, request: Request):
        s = self.s
        s.admission.authorize(request)
        card = p.ModelCard(
            id=s.model_name,
            created=self.created,
            root=s.config.model,
            max_model_len=s.engine.max_model_len,
            vocab_size=s.engine.vocab_size,
        )
        adapters = [  # vLLM's shape: each loaded LoRA adapter is a model whose parent is the served one
            p.ModelCard(id=name, created=self.created, root=path, parent=s.model_name)
            for name, path in sorted(s.engine.loras.items())
        ]
        return p.ModelList(data=[card, *adapters]).model_dump()

    async def tokenize(self, request: Request):
        s = self.s
        req: p.TokenizeRequest = await s.admission.admit(request, p.TokenizeRequest, shed_load=False)
        if req.messages is not None:  # the template writes the special tokens itself
            text = s.builder.render_chat(req)
            ids = await s.builder.encode(text, "messages", add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = await s.builder.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        strs = s.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return p.TokenizeResponse(
            count=len(ids), max_model_len=s.engine.max_model_len, tokens=ids, token_strs=strs
        ).model_dump()

    async def detokenize(self, request: Request):
        s = self.s
        req: p.DetokenizeRequest = await s.admission.admit(request, p.DetokenizeRequest, shed_load=False)
        vocab_size = s.engine.vocab_size
        if req.tokens and max(req.tokens) >= vocab_size:
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", param="tokens")
        return p.DetokenizeResponse(prompt=s.tokenizer.decode(req.tokens)).model_dump()
