"""POST /v1/completions: prompts (text or token ids, one or several) to completions, streamed or not, with echo
and logprobs."""

from __future__ import annotations

import time
from functools import partial

from fastapi import Request

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.formatting import ChoiceDelta, StreamFormatter, usage
from kubellm.runtime.server.serving import Serving


class Completions:
    def __init__(self, serving: Serving):
        self.s = serving

    async def create(self, request: Request):
        s = self.s
        req: p.CompletionRequest = await s.admission.admit(request, p.CompletionRequest)
        params = await s.builder.sampling_params(req, req.max_tokens, req.logprobs)
        requests = await s.builder.make_requests(req.prompts(), params, req.priority, req.max_tokens)
        # one id and timestamp for every chunk of the response, as OpenAI's
        response = partial(
            p.CompletionResponse, id=f"cmpl-{request.state.request_id}", created=int(time.time()), model=s.model_name
        )
        echo = [
            (r.prompt if r.prompt is not None else s.tokenizer.decode(r.prompt_token_ids)) if req.echo else ""
            for r in requests
        ]
        with_logprobs = req.logprobs is not None

        if req.stream:

            def chunks(d: ChoiceDelta):
                if d.content:
                    lps = s.logprobs.completion(d.logprobs, d.offset) if d.logprobs is not None else None
                    choice = p.CompletionChoice(
                        index=d.index,
                        text=d.text,
                        logprobs=lps,
                        finish_reason=d.finish_reason,
                        stop_reason=d.stop_reason,
                    )
                    yield response(choices=[choice])

            include_usage = req.stream_options and req.stream_options.include_usage
            return await s.stream(
                requests,
                request,
                StreamFormatter(req.n, with_logprobs, prefixes=echo),
                chunks,
                (lambda u: response(choices=[], usage=u)) if include_usage else None,
            )

        outs = await s.runner.collect(requests, request)
        for out in outs:
            s.runner.check_timeout(out)
        choices = [
            p.CompletionChoice(
                index=i * req.n + c.index,
                text=echo[i] + c.text,
                logprobs=s.logprobs.completion(c.logprobs, 0) if with_logprobs and c.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, out in enumerate(outs)
            for c in out.outputs
        ]
        return response(choices=choices, usage=usage(outs)).model_dump()
