"""POST /v1/chat/completions: messages rendered through the chat template, answered as one assistant message per
choice, streamed or not, with logprobs, structured output and vLLM's extras (echo, prompt_logprobs, token ids)."""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

from fastapi import Request

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.chat_output import ChatOutput
from kubellm.runtime.server.formatting import ChoiceDelta, StreamFormatter, usage
from kubellm.runtime.server.serving import Serving

if TYPE_CHECKING:
    from kubellm.runtime.engine.intake import Submission


class ChatCompletions:
    def __init__(self, serving: Serving):
        self.s = serving

    async def submissions(self, req: p.ChatCompletionRequest) -> list[Submission]:
        """The one engine submission of this request: the messages through the chat template, tokenized, with
        its sampling parameters (also what /v1/chat/completions/render answers)."""
        s = self.s
        ids = await s.builder.encode(s.builder.render_chat(req), "messages", add_special_tokens=False)
        max_tokens = req.max_new_tokens
        top = req.top_logprobs or 0 if req.logprobs else None
        params = await s.builder.sampling_params(req, max_tokens, top)
        return await s.builder.make_requests(
            [ids], params, req.priority, max_tokens, req.truncate_prompt_tokens, model=req.model
        )

    async def create(self, request: Request):
        s = self.s
        req: p.ChatCompletionRequest = await s.admission.admit(request, p.ChatCompletionRequest)
        requests = await self.submissions(req)
        rid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
        as_ids = bool(req.return_tokens_as_token_ids)
        token_ids = bool(req.return_token_ids)
        # vLLM's echo: the answer starts with the last message when it is the assistant's (continue_final_message)
        last = req.messages[-1]
        echo = last.text() if req.echo and last.role == "assistant" else ""
        output = ChatOutput.for_request(req, s.config)  # tool calls, reasoning: chat_output.py

        def prompt_logprobs_of(out):
            return s.logprobs.prompt(out.prompt_logprobs, as_ids) if req.prompt_logprobs is not None else None

        if req.stream:
            chunk = partial(p.ChatCompletionChunk, id=rid, created=created, model=s.answered_model(req.model))
            continuous = req.stream_options and req.stream_options.include_usage
            continuous = continuous and req.stream_options.continuous_usage_stats
            streams = output.streams()

            def chunks(d: ChoiceDelta):
                u = usage([d.output]) if continuous else None
                if d.first:
                    yield chunk(
                        choices=[p.ChatChunkChoice(index=d.index, delta=p.DeltaMessage(role="assistant", content=""))],
                        usage=u,
                        prompt_token_ids=d.output.prompt_token_ids if token_ids else None,
                    )
                delta, finish_reason = streams.delta(d.index, d.text, d.finish_reason) if d.content else (None, None)
                if delta is not None or finish_reason is not None or d.logprobs:  # (delta None: held back)
                    choice = p.ChatChunkChoice(
                        index=d.index,
                        delta=delta or p.DeltaMessage(),
                        logprobs=s.logprobs.chat(d.logprobs, as_ids) if d.logprobs is not None else None,
                        finish_reason=finish_reason,
                        stop_reason=d.stop_reason,
                        token_ids=d.token_ids if token_ids else None,
                    )
                    yield chunk(choices=[choice], usage=u)

            include_usage = req.stream_options and req.stream_options.include_usage
            return await s.stream(
                requests,
                request,
                StreamFormatter(req.n, req.logprobs, prefixes=[echo] if echo else None),
                chunks,
                (lambda u: chunk(choices=[], usage=u)) if include_usage else None,
            )

        (out,) = await s.runner.collect(requests, request)
        s.runner.check_timeout(out)
        choices = [
            p.ChatChoice(
                index=c.index,
                message=message,
                logprobs=s.logprobs.chat(c.logprobs, as_ids) if req.logprobs and c.logprobs else None,
                finish_reason=finish_reason,
                stop_reason=c.stop_reason,
                token_ids=c.token_ids if token_ids else None,
            )
            for c in out.outputs
            for message, finish_reason in [output.message(echo + c.text, c.finish_reason)]
        ]
        return p.ChatCompletionResponse(
            id=rid,
            created=created,
            model=s.answered_model(req.model),
            choices=choices,
            usage=usage([out]),
            prompt_logprobs=prompt_logprobs_of(out),
            prompt_token_ids=out.prompt_token_ids if token_ids else None,
        ).model_dump()
