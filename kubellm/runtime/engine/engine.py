"""LLMEngine (synchronous: add_request / abort_request / step) and AsyncLLMEngine (the same engine driven
by a background thread, with one asyncio stream per request, for the HTTP server).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.scheduler import Scheduler
from kubellm.runtime.engine.sequence import RequestOutput, Sequence
from kubellm.runtime.model.loader import read_model_info
from kubellm.runtime.model.runner import ModelRunner
from kubellm.runtime.sampling_params import SamplingParams

log = logging.getLogger("kubellm.engine")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = 0.0

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        first = self.seqs[0]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.to_completion() for s in self.seqs],
            finished=self.finished,
            num_cached_tokens=first.num_cached_tokens,
            arrival_time=self.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min((s.first_token_time for s in self.seqs if s.first_token_time), default=None),
        )


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # computed prompt tokens (prefix-cache hits excluded)
    generation_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        info = read_model_info(config.model, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self._backend = self.tokenizer.backend_tokenizer  # the Rust tokenizer, for batched decodes
        shape = info.shape
        max_len = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        if shape.sliding_window:  # keep attention exact: never exceed the window we do not implement
            max_len = min(max_len, shape.sliding_window)
        self.runner = ModelRunner(config, info, max_len)
        # one sequence alone must always fit in the cache, or it could never finish
        self.max_model_len = min(max_len, self.runner.num_gpu_blocks * config.block_size)
        self.vocab_size = shape.vocab_size
        self.eos_token_ids = set(info.eos_token_ids)
        self.block_manager = BlockManager(
            self.runner.num_gpu_blocks, config.block_size, config.enable_prefix_caching, self.runner.num_cpu_blocks
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    # ------------------------------------------------------------------ intake
    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and tokenize; touches no engine state, so any thread may call it."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but this model's context holds {self.max_model_len} "
                f"(prompt plus at least one generated token)"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, text, ids, params, arrival_time=arrival)
        req.seqs = [Sequence(request_id, i, ids, params, max_tokens, priority, arrival) for i in range(params.n)]
        if self.config.enable_prefix_caching:
            for s in req.seqs[1:]:
                s.prefix_source = req.seqs[0]
        return req

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0) -> None:
        self.add(self.make_request(request_id, prompt, params or SamplingParams(), priority))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish("abort")
        return req.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.swapped)

    def oldest_waiting_age(self) -> float:
        """Seconds the longest-waiting never-scheduled request has waited (0 if none); safe from any thread."""
        arrivals = [s.arrival_time for s in list(self.scheduler.waiting) if s.first_scheduled_time is None]
        return time.monotonic() - min(arrivals) if arrivals else 0.0

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and report every request that changed."""
        out = self.scheduler.schedule()
        sampled, tokens, logprobs = self.runner.execute(out)
        touched: dict[str, None] = dict.fromkeys(s.request_id for s in out.timed_out)
        now = time.monotonic()
        for seq, n in out.scheduled:
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)
        for seq, token, lp in zip(sampled, tokens, logprobs):
            seq.append_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if lp is not None:
                seq.logprobs.append(lp)
            touched[seq.request_id] = None
        self.stats.generation_tokens += len(sampled)
        text_before = self._detokenize([s for s in sampled if s.params.detokenize])
        for seq, token in zip(sampled, tokens):
            self._check_finished(seq, token, text_before.get(seq.seq_id, 0))
            if seq.is_finished:
                self.scheduler.remove(seq)
        results = []
        for request_id in touched:
            req = self.requests.get(request_id)
            if req is None:
                continue
            results.append(req.output())
            if req.finished:
                del self.requests[request_id]
        return results

    def _check_finished(self, seq: Sequence, token: int, text_before: int) -> None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop")
        elif token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif p.stop and p.detokenize and self._check_stop_strings(seq, text_before):
            return
        elif seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.params.detokenize and seq.read_offset < len(seq.token_ids):  # flush a trailing partial character
            seq.text += self._decode_batch([seq.token_ids[seq.read_offset :]], seq.params.skip_special_tokens)[0]
        if reason == "stop" and stop_reason is None and seq.params.detokenize and seq.params.stop:
            self._check_stop_strings(seq)
        if not seq.is_finished:
            seq.finish(reason, stop_reason)

    def _decode_batch(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        """Many decodes in one call to the Rust tokenizer (the Python wrapper costs more than the decode)."""
        texts = self._backend.decode_batch(ids, skip_special_tokens=skip_special_tokens)
        if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            texts = [self.tokenizer.clean_up_tokenization(t) for t in texts]
        return texts

    def _detokenize(self, seqs: list[Sequence]) -> dict[int, int]:
        """Append each sequence's newly complete text (vLLM's incremental detokenization with prefix/read
        offsets), batched over the step; returns each sequence's text length before."""
        before = {s.seq_id: len(s.text) for s in seqs}
        for skip in (True, False):
            group = [s for s in seqs if s.params.skip_special_tokens is skip]
            if not group:
                continue
            prefixes = self._decode_batch([s.token_ids[s.prefix_offset : s.read_offset] for s in group], skip)
            fulls = self._decode_batch([s.token_ids[s.prefix_offset :] for s in group], skip)
            for seq, prefix, full in zip(group, prefixes, fulls):
                if len(full) > len(prefix) and not full.endswith("\ufffd"):
                    seq.text += full[len(prefix) :]
                    seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.token_ids)
        return before

    @staticmethod
    def _check_stop_strings(seq: Sequence, text_before: int = 0) -> bool:
        """Cut the text at the earliest stop string (not returned) and finish; True if one was found.
        Only the new text (plus room for a stop string straddling it) is searched."""
        start = max(text_before - max(len(s) for s in seq.params.stop) + 1, 0)
        found = [(seq.text.find(s, start), s) for s in seq.params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return False
        index, stop = min(found)
        seq.text = seq.text[:index]
        seq.finish("stop", stop)
        return True


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


class AsyncLLMEngine:
    """Drives an LLMEngine from one background thread; the asyncio side only enqueues and awaits."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Request) | ("abort", request_id)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubellm-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        return self.generate_request(self.engine.make_request(request_id, prompt, params, priority))

    async def generate_request(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; leaving early (client gone, task cancelled) aborts it."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        request_id = req.request_id
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(("add", req))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add(payload)
                except ValueError as e:
                    self._deliver(payload.request_id, e)
            else:
                self.engine.abort_request(payload)

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                self._deliver_all([(out.request_id, out) for out in self.engine.step()])
        except BaseException as e:  # the server reports the engine dead (/health) rather than hanging
            log.exception("engine loop died")
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"engine failure: {e}"))
