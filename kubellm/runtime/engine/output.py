"""The frontend's side of every request: the core's token deltas → RequestOutputs, with all detokenization and
stop-string matching in this one place (as vLLM V1's output processor). Used by the server process
(async_engine.py) and by LLMEngine in one process; a sequence whose text hits a stop string is finished here
and reported back as an Abort for the core.

Detokenization is incremental (vLLM's prefix/read offsets) and batched over every stream of a step into the
Rust tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kubellm.runtime.engine.wire import Abort, RequestDelta, TokenLogprob
from kubellm.runtime.sampling_params import SamplingParams

PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (a leading space, a merged byte)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout" | "error" | None while running
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1 … (the first has none), if asked for
    error: str | None = None  # why the engine failed the request (finish_reason "error")


def view_of(work: RequestOutput) -> RequestOutput:
    """An empty output shaped like work, for a consumer that must see changes only when it asks (publish)."""
    return RequestOutput(
        work.request_id,
        work.prompt,
        work.prompt_token_ids,
        [CompletionOutput(c.index, "", [], None, [] if c.logprobs is not None else None) for c in work.outputs],
        False,
        arrival_time=work.arrival_time,
    )


# what publish copies, fixed per class (it runs for every stream every step)
_REQUEST_FIELDS = tuple(f.name for f in fields(RequestOutput) if f.name not in ("outputs", "prompt_token_ids"))
_COMPLETION_FIELDS = tuple(f.name for f in fields(CompletionOutput))


def _catch_up(view, work, names: tuple[str, ...]) -> None:
    for name in names:
        new = getattr(work, name)
        if isinstance(new, list):  # grows only: copy the tail
            old = getattr(view, name)
            if old is None:
                setattr(view, name, list(new))
            else:
                old.extend(new[len(old) :])
        else:
            setattr(view, name, new)


def publish(work: RequestOutput, view: RequestOutput) -> None:
    """Bring view up to date with work. The server's streams hand out views: the OutputProcessor updates work
    whenever a step arrives, which may be while a consumer is half-way through the previous state."""
    _catch_up(view, work, _REQUEST_FIELDS)
    for v, w in zip(view.outputs, work.outputs):
        _catch_up(v, w, _COMPLETION_FIELDS)


@dataclass(slots=True)
class TextState:
    """One stream's detokenization: the last prompt tokens and the generated ones, decoded up to read_offset."""

    token_ids: list[int]
    prefix_offset: int
    read_offset: int
    text: str = ""  # everything decoded so far (CompletionOutput.text holds back a possible partial stop string)

    @classmethod
    def after_prompt(cls, prompt_token_ids: list[int]) -> TextState:
        tail = list(prompt_token_ids[-PROMPT_CONTEXT:])
        return cls(tail, 0, len(tail))


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: the Python wrapper costs more than a decode
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def decode_batch(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        texts = self.backend.decode_batch(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up:
            texts = [self.tokenizer.clean_up_tokenization(t) for t in texts]
        return texts

    def advance(self, streams: list[TextState], skip_special_tokens: list[bool]) -> None:
        """Append each stream's newly complete text; a trailing partial character waits for the next token."""
        for skip in (True, False):
            group = [s for s, k in zip(streams, skip_special_tokens) if k is skip]
            if not group:
                continue
            prefixes = self.decode_batch([s.token_ids[s.prefix_offset : s.read_offset] for s in group], skip)
            fulls = self.decode_batch([s.token_ids[s.prefix_offset :] for s in group], skip)
            for s, prefix, full in zip(group, prefixes, fulls):
                if len(full) > len(prefix) and not full.endswith("\ufffd"):
                    s.text += full[len(prefix) :]
                    s.prefix_offset, s.read_offset = s.read_offset, len(s.token_ids)

    def flush(self, stream: TextState, skip_special_tokens: bool) -> None:
        """At the end: whatever is left (a partial character decodes to U+FFFD, as HF's decode would)."""
        if stream.read_offset < len(stream.token_ids):
            stream.text += self.decode_batch([stream.token_ids[stream.read_offset :]], skip_special_tokens)[0]
            stream.read_offset = len(stream.token_ids)


@dataclass(slots=True)
class RequestState:
    params: SamplingParams
    output: RequestOutput
    texts: list[TextState] | None  # one per sequence; None: token ids only (params.detokenize off)
    open: list[bool] = field(default_factory=list)  # per sequence: not finished yet (here)


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:] (start: how far back a stop string straddling new text may begin)."""
    found = [(text.find(s, start), s) for s in stops]
    found = [(i, s) for i, s in found if i >= 0]
    return min(found) if found else None


def held_back(text: str, params: SamplingParams) -> str:
    """Text safe to show while running: a possible partial stop string at the end is held back."""
    if not params.stop:
        return text
    hold = max(len(s) for s in params.stop) - 1
    return text[: max(len(text) - hold, 0)] if hold else text


class OutputProcessor:
    def __init__(self, tokenizer):
        self.detokenizer = Detokenizer(tokenizer)
        self.requests: dict[str, RequestState] = {}

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, arrival: float
    ) -> RequestOutput:
        """Track a request sent to the core; returns its (empty) output, which process() fills in."""
        logprobs = params.logprobs is not None
        out = RequestOutput(
            request_id,
            prompt,
            prompt_token_ids,
            [CompletionOutput(i, "", [], None, [] if logprobs else None) for i in range(params.n)],
            False,
            arrival_time=arrival,
        )
        texts = [TextState.after_prompt(prompt_token_ids) for _ in range(params.n)] if params.detokenize else None
        self.requests[request_id] = RequestState(params, out, texts, [True] * params.n)
        return out

    def abort(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """Finish every open sequence of a request with "abort" (or "error", with the engine's reason) and stop
        tracking it."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for c, is_open in zip(state.output.outputs, state.open):
            if is_open:
                c.finish_reason = "abort" if error is None else "error"
        state.output.finished = True
        state.output.error = error
        return state.output

    def process(self, deltas: list[RequestDelta]) -> tuple[list[RequestOutput], list[Abort]]:
        """Fold one step's deltas in. Returns the outputs that changed, and the sequences the core must stop
        (their stop string appeared). Finished requests are no longer tracked afterwards."""
        changed, aborts, new_text = [], [], []
        for delta in deltas:
            state = self.requests.get(delta.request_id)
            if state is None:  # finished here already (a stop string) or aborted
                continue
            out = state.output
            out.num_cached_tokens = delta.num_cached_tokens
            out.first_scheduled_time = delta.first_scheduled_time
            out.first_token_time = delta.first_token_time
            if delta.prompt_logprobs is not None:
                out.prompt_logprobs = delta.prompt_logprobs
            for c in delta.outputs:
                if not state.open[c.index]:
                    continue
                completion = out.outputs[c.index]
                if state.texts is None:
                    self._append(completion, c.token_ids, c.logprobs)
                    if c.finish_reason is not None:
                        self._close(state, c.index, c.finish_reason, c.stop_reason)
                else:
                    new_text.append((state, c))
            changed.append(out)
        self._detokenize(new_text, aborts)
        for out in changed:
            if all(not is_open for is_open in self.requests[out.request_id].open):
                out.finished = True
                del self.requests[out.request_id]
        return changed, aborts

    # ------------------------------------------------------------------ text
    def _detokenize(self, items: list, aborts: list[Abort]) -> None:
        """Decode the step's new tokens (batched), then look for stop strings in the new text. A sequence with
        stop strings that got several tokens at once is decoded token by token, so its output ends exactly at
        the token that completed the stop string."""
        batch = [(s, c) for s, c in items if not (s.params.stop and len(c.token_ids) > 1)]
        if batch:
            before = [len(s.texts[c.index].text) for s, c in batch]
            for s, c in batch:
                s.texts[c.index].token_ids.extend(c.token_ids)
            self.detokenizer.advance(
                [s.texts[c.index] for s, c in batch], [s.params.skip_special_tokens for s, _ in batch]
            )
            for (s, c), start in zip(batch, before):
                self._after_text(s, c.index, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason, start, aborts)
        for s, c in items:
            if s.params.stop and len(c.token_ids) > 1:
                self._one_by_one(s, c, aborts)

    def _one_by_one(self, state: RequestState, c, aborts: list[Abort]) -> None:
        text = state.texts[c.index]
        last = len(c.token_ids) - 1
        for k, token in enumerate(c.token_ids):
            if not state.open[c.index]:
                return
            start = len(text.text)
            text.token_ids.append(token)
            self.detokenizer.advance([text], [state.params.skip_special_tokens])
            lps = None if c.logprobs is None else c.logprobs[k : k + 1]
            reason, stop = (c.finish_reason, c.stop_reason) if k == last else (None, None)
            self._after_text(state, c.index, [token], lps, reason, stop, start, aborts)

    def _after_text(self, state, index, token_ids, logprobs, reason, stop_token, start, aborts) -> None:
        """Record new tokens whose text has been decoded; finish the sequence as the engine would have: a stop
        token as is, EOS or a complete grammar after a last stop-string check of the flushed text, and a
        stop string found in the new text before the length limit."""
        params, text = state.params, state.texts[index]
        completion = state.output.outputs[index]
        self._append(completion, token_ids, logprobs)
        if reason == "stop":
            self.detokenizer.flush(text, params.skip_special_tokens)
            found = find_stop(text.text, params.stop, 0) if stop_token is None and params.stop else None
            if found:
                text.text = text.text[: found[0]]
            completion.text = text.text
            self._close(state, index, "stop", found[1] if found else stop_token)
            return
        found = (
            find_stop(text.text, params.stop, max(start - max(map(len, params.stop)) + 1, 0))
            if params.stop and len(completion.token_ids) > params.min_tokens  # vLLM: none before min_tokens
            else None
        )
        if found:
            text.text = text.text[: found[0]]
            completion.text = text.text
            self._close(state, index, "stop", found[1])
            if reason is None:  # the core is still generating it
                aborts.append(Abort(state.output.request_id, index))
        elif reason is not None:  # "length"; or "abort", "timeout" with nothing new
            if reason == "length":
                self.detokenizer.flush(text, params.skip_special_tokens)
            completion.text = text.text
            self._close(state, index, reason, stop_token)
        else:
            completion.text = held_back(text.text, params)

    @staticmethod
    def _append(completion: CompletionOutput, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> None:
        completion.token_ids.extend(token_ids)
        if logprobs:
            completion.logprobs.extend(logprobs)

    @staticmethod
    def _close(state: RequestState, index: int, reason: str, stop_reason: str | int | None) -> None:
        completion = state.output.outputs[index]
        completion.finish_reason, completion.stop_reason = reason, stop_reason
        state.open[index] = False
