"""Turning engine outputs into OpenAI response parts: the per-choice deltas of a stream (one formatter shared by
completions and chat), logprobs in both endpoints' shapes, usage, and server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from kubellm.runtime.engine.output import RequestOutput
from kubellm.runtime.engine.wire import TokenLogprob
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.errors import ApiError

DONE = "data: [DONE]\n\n"


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice of a stream gained since its last delta."""

    index: int  # the choice's index in the response (request i's choice c: i * n + c)
    first: bool  # the choice's first delta (chat sends its role here)
    content: bool  # there is something to send: text, the prefix, or the finish
    text: str  # the prefix (first delta only) and the new text
    offset: int  # characters of the choice's text sent before this delta (the prefix not counted)
    logprobs: list[TokenLogprob] | None  # the new tokens' logprobs, with content; None if not asked for
    finish_reason: str | None
    stop_reason: str | int | None


class StreamFormatter:
    """Per-choice bookkeeping of a stream: the text and logprobs already sent, and which choices have finished
    (a finished choice gets exactly one delta with its finish_reason, however long the others run)."""

    def __init__(self, n: int, logprobs: bool, prefixes: list[str] | None = None):
        self.n = n
        self.logprobs = logprobs
        self.prefixes = prefixes  # per request, sent before the choice's first text (completions' echo)
        self._sent: dict[int, int] = {}
        self._sent_logprobs: dict[int, int] = {}
        self._finished: set[int] = set()

    def deltas(self, i: int, out: RequestOutput) -> Iterator[ChoiceDelta]:
        """The deltas of request i's latest output: one per choice that is new, has new text or has finished."""
        for c in out.outputs:
            index = i * self.n + c.index
            if index in self._finished:
                continue
            first = index not in self._sent
            offset = self._sent.get(index, 0)
            text = (self.prefixes[i] if first and self.prefixes else "") + c.text[offset:]
            content = bool(text) or c.finish_reason is not None
            if not (first or content):
                continue
            self._sent[index] = len(c.text)
            logprobs = None
            if content and self.logprobs and c.logprobs:
                logprobs = c.logprobs[self._sent_logprobs.get(index, 0) :]
                self._sent_logprobs[index] = len(c.logprobs)
            if c.finish_reason is not None:
                self._finished.add(index)
            yield ChoiceDelta(index, first, content, text, offset, logprobs, c.finish_reason, c.stop_reason)


class LogprobFormatter:
    """Token logprobs as completions (tokens, offsets, top maps) and chat (entries with bytes) write them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text_of(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def completion(self, lps: list[TokenLogprob], offset: int) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        for lp in lps:
            tok = self.text_of(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.text_of(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def _entry(self, token_id: int, logprob: float) -> p.TopLogprob:
        s = self.text_of(token_id)
        return p.TopLogprob(token=s, logprob=logprob, bytes=list(s.encode()))

    def chat(self, lps: list[TokenLogprob]) -> p.ChatLogprobs:
        return p.ChatLogprobs(
            content=[
                p.TokenLogprobEntry(
                    **self._entry(lp.token_id, lp.logprob).model_dump(),
                    top_logprobs=[self._entry(t, v) for t, v in lp.top],
                )
                for lp in lps
            ]
        )


def usage(outs: list[RequestOutput]) -> p.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return p.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details={"cached_tokens": sum(o.num_cached_tokens for o in outs)},
    )


def sse(obj: BaseModel | str) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


async def stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    """Wait for the first event before answering 200, so errors before any token get a real status."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = ""
    except BaseException:
        await gen.aclose()
        raise

    async def body():
        try:
            yield first
            async for chunk in gen:
                yield chunk
        except ApiError as e:  # after the 200: report in-band, then end the stream properly
            yield sse(json.dumps({"error": {"message": e.message, "type": e.type, "code": e.status}}))
            yield DONE

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
