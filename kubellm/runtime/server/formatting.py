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
    token_ids: list[int]  # the new tokens
    output: RequestOutput  # the request's output (its prompt, prompt logprobs, usage so far)


class StreamFormatter:
    """Per-choice bookkeeping of a stream: the text and logprobs already sent, and which choices have finished
    (a finished choice gets exactly one delta with its finish_reason, however long the others run)."""

    def __init__(self, n: int, logprobs: bool, prefixes: list[str] | None = None, generated: bool = True):
        self.n = n
        self.logprobs = logprobs
        self.prefixes = prefixes  # per request, sent before the choice's first text (echo)
        self.generated = generated  # False: the generated tokens are not sent (echo with max_tokens 0)
        self._sent: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
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
            new_text = c.text[offset:] if self.generated else ""
            text = (self.prefixes[i] if first and self.prefixes else "") + new_text
            content = bool(text) or c.finish_reason is not None
            if not (first or content):
                continue
            self._sent[index] = len(c.text)
            logprobs = None
            if content and self.logprobs and c.logprobs and self.generated:
                logprobs = c.logprobs[self._sent_logprobs.get(index, 0) :]
                self._sent_logprobs[index] = len(c.logprobs)
            token_ids = []
            if content and self.generated:
                token_ids = c.token_ids[self._sent_tokens.get(index, 0) :]
                self._sent_tokens[index] = len(c.token_ids)
            if c.finish_reason is not None:
                self._finished.add(index)
            yield ChoiceDelta(
                index, first, content, text, offset, logprobs, c.finish_reason, c.stop_reason, token_ids, out
            )


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # vLLM's floor: JSON has no -inf


class LogprobFormatter:
    """Token logprobs as completions (tokens, offsets, top maps) and chat (entries with bytes) write them, and
    vLLM's prompt_logprobs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text_of(self, token_id: int, as_id: bool = False) -> str:
        """A token's text (as_id: vLLM's return_tokens_as_token_ids, "token_id:<id>")."""
        if as_id:
            return f"token_id:{token_id}"
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def completion(
        self,
        lps: list[TokenLogprob],
        offset: int,
        as_ids: bool = False,
        prompt: tuple[list[int], list[TokenLogprob], int] | None = None,
    ) -> p.CompletionLogprobs:
        """The completions shape: each token's text, logprob, a map of it and its top alternatives (as OpenAI
        and vLLM: logprobs 0 maps the token alone), and its offset into the text. prompt: (prompt token ids,
        their prompt logprobs, how many alternatives) for echo: the prompt's tokens come first, the first
        without a logprob."""
        out = p.CompletionLogprobs()
        if prompt is not None:
            ids, prompt_lps, n = prompt
            tok = self.text_of(ids[0], as_ids)
            out.tokens.append(tok)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(tok)
            offset = self._add(
                out, [TokenLogprob(lp.token_id, lp.logprob, lp.top[:n]) for lp in prompt_lps], offset, as_ids
            )
        self._add(out, lps, offset, as_ids)
        return out

    def _add(self, out: p.CompletionLogprobs, lps: list[TokenLogprob], offset: int, as_ids: bool) -> int:
        for lp in lps:
            tok = self.text_of(lp.token_id, as_ids)
            out.tokens.append(tok)
            out.token_logprobs.append(_finite(lp.logprob))
            top = {tok: _finite(lp.logprob)}
            for t, v in lp.top:
                top.setdefault(self.text_of(t, as_ids), _finite(v))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(tok)
        return offset

    def _entry(self, token_id: int, logprob: float, as_id: bool) -> p.TopLogprob:
        s = self.text_of(token_id, as_id)
        return p.TopLogprob(token=s, logprob=_finite(logprob), bytes=list(s.encode()))

    def chat(self, lps: list[TokenLogprob], as_ids: bool = False) -> p.ChatLogprobs:
        return p.ChatLogprobs(
            content=[
                p.TokenLogprobEntry(
                    **self._entry(lp.token_id, lp.logprob, as_ids).model_dump(),
                    top_logprobs=[self._entry(t, v, as_ids) for t, v in lp.top],
                )
                for lp in lps
            ]
        )

    def prompt(self, lps: list[TokenLogprob] | None, as_ids: bool = False) -> p.PromptLogprobs | None:
        """vLLM's prompt_logprobs: None for the first token, then token id → {logprob, rank, decoded_token} for
        the prompt's token and its top alternatives (ranks 1 …)."""
        if lps is None:
            return None
        out: p.PromptLogprobs = [None]
        for lp in lps:
            entry = {
                lp.token_id: p.PromptLogprob(
                    logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=self.text_of(lp.token_id, as_ids)
                )
            }
            for rank, (t, v) in enumerate(lp.top, 1):
                entry.setdefault(
                    t, p.PromptLogprob(logprob=_finite(v), rank=rank, decoded_token=self.text_of(t, as_ids))
                )
            out.append(entry)
        return out


def usage(outs: list[RequestOutput], generated: bool = True) -> p.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs) if generated else 0
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
