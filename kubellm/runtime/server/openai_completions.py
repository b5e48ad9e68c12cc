"""POST /v1/completions: prompts (text or token ids, one or several) to completions, streamed or not, with echo
(max_tokens 0 scores the prompt alone, as evaluation harnesses do), logprobs and vLLM's prompt_logprobs."""

from __future__ import annotations

import time
from functools import partial

from fastapi import Request

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.errors import ApiError
from kubellm.runtime.server.formatting import ChoiceDelta, StreamFormatter, usage
from kubellm.runtime.server.serving import Serving


class Completions:
    def __init__(self, serving: Serving):
        self.s = serving

    async def submissions(self, req: p.CompletionRequest) -> tuple[list, bool]:
        """The engine submissions, and whether the generated tokens are answered (max_tokens 0 with echo: the
        prompt alone, though the engine still makes one token). Echo with logprobs scores the prompt's tokens
        too (vLLM: prompt_logprobs = logprobs)."""
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(
                400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)", param="max_tokens"
            )
        generated = req.max_tokens != 0
        max_tokens = req.max_tokens if generated else 1
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt_logprobs = max(req.prompt_logprobs or 0, req.logprobs)
        params = await self.s.builder.sampling_params(req, max_tokens, req.logprobs, prompt_logprobs)
        prompts = req.prompts()
        requests = await self.s.builder.make_requests(
            prompts, params, req.priority, max_tokens, req.truncate_prompt_tokens, model=req.model
        )
        return requests, generated

    def _response(self, request: Request, req: p.CompletionRequest):
        """The response (or chunk) with one id and timestamp for all of it, as OpenAI's."""
        model = self.s.answered_model(req.model)
        return partial(
            p.CompletionResponse, id=f"cmpl-{request.state.request_id}", created=int(time.time()), model=model
        )

    async def create(self, request: Request):
        s = self.s
        req: p.CompletionRequest = await s.admission.admit(request, p.CompletionRequest)
        requests, generated = await self.submissions(req)
        echo_logprobs = req.echo and req.logprobs is not None
        response = self._response(request, req)
        echo = [
            (r.prompt if r.prompt is not None else s.tokenizer.decode(r.prompt_token_ids)) if req.echo else ""
            for r in requests
        ]
        with_logprobs = req.logprobs is not None
        as_ids = bool(req.return_tokens_as_token_ids)
        token_ids = bool(req.return_token_ids)

        def logprobs(lps, offset: int, out, first: bool) -> p.CompletionLogprobs | None:
            if not with_logprobs:
                return None
            prompt = None
            if echo_logprobs and first:
                prompt = (out.prompt_token_ids, out.prompt_logprobs or [], req.logprobs)
            if not lps and prompt is None:
                return None
            return s.logprobs.completion(lps or [], offset, as_ids, prompt)

        def prompt_logprobs_of(out):
            return s.logprobs.prompt(out.prompt_logprobs, as_ids) if req.prompt_logprobs is not None else None

        if req.stream:
            continuous = req.stream_options and req.stream_options.include_usage
            continuous = continuous and req.stream_options.continuous_usage_stats

            def chunks(d: ChoiceDelta):
                if d.content:
                    out = d.output
                    # offsets count the echoed prompt first, as in the non-streamed response
                    echoed = len(echo[d.index // req.n])
                    offset = 0 if echo_logprobs and d.first else d.offset + echoed
                    choice = p.CompletionChoice(
                        index=d.index,
                        text=d.text,
                        logprobs=logprobs(d.logprobs, offset, out, d.first),
                        finish_reason=d.finish_reason,
                        stop_reason=d.stop_reason,
                        prompt_logprobs=prompt_logprobs_of(out) if d.first else None,
                        prompt_token_ids=out.prompt_token_ids if token_ids and d.first else None,
                        token_ids=d.token_ids if token_ids else None,
                    )
                    yield response(choices=[choice], usage=usage([out], generated) if continuous else None)

            include_usage = req.stream_options and req.stream_options.include_usage
            return await s.stream(
                requests,
                request,
                StreamFormatter(req.n, with_logprobs, prefixes=echo, generated=generated),
                chunks,
                (lambda u: response(choices=[], usage=u)) if include_usage else None,
                generated,
            )

        outs = await s.runner.collect(requests, request)
        for out in outs:
            s.runner.check_timeout(out)
        choices = [
            p.CompletionChoice(
                index=i * req.n + c.index,
                text=echo[i] + (c.text if generated else ""),
                logprobs=logprobs(c.logprobs if generated else [], 0, out, True),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                prompt_logprobs=prompt_logprobs_of(out),
                prompt_token_ids=out.prompt_token_ids if token_ids else None,
                token_ids=(c.token_ids if generated else []) if token_ids else None,
            )
            for i, out in enumerate(outs)
            for c in out.outputs
        ]
        return response(choices=choices, usage=usage(outs, generated)).model_dump()
