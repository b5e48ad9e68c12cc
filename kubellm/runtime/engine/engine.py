"""LLMEngine: add_request / abort_request / step over the scheduler, the model runner and incremental
detokenization. Synchronous; the server drives it from its own process (async_engine.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.detokenizer import Detokenizer
from kubellm.runtime.engine.guided import Grammars
from kubellm.runtime.engine.runner import LaunchedStep, ModelRunner
from kubellm.runtime.engine.scheduler import Scheduler, SchedulerOutput
from kubellm.runtime.engine.sequence import RequestDelta, RequestOutput, Sequence
from kubellm.runtime.model.loader import read_model_info
from kubellm.runtime.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = 0.0

    # read for every request every step: the one-sequence case skips the generator expressions
    @property
    def finished(self) -> bool:
        seqs = self.seqs
        return seqs[0].is_finished if len(seqs) == 1 else all(s.is_finished for s in seqs)

    @property
    def first_token_time(self) -> float | None:
        seqs = self.seqs
        if len(seqs) == 1:
            return seqs[0].first_token_time
        return min((s.first_token_time for s in seqs if s.first_token_time), default=None)

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
            first_token_time=self.first_token_time,
        )

    def delta(self) -> RequestDelta:
        first = self.seqs[0]
        return (
            self.request_id,
            self.finished,
            first.num_cached_tokens,
            first.first_scheduled_time,
            self.first_token_time,
            [s.take_delta() for s in self.seqs],
        )


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # computed prompt tokens (prefix-cache hits excluded)
    generation_tokens: int = 0


@dataclass(slots=True)
class EngineSnapshot:
    """The engine's gauges and counters at one instant: what metrics and load shedding read."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    oldest_waiting_arrival: float | None = None  # time.monotonic() of the longest-waiting unscheduled request


def tokenize_prompt(tokenizer, prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text or as token ids."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt, add_special_tokens=True)
    return None, [int(t) for t in prompt]


def check_request(ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Refuse a request the engine could never run, with a message for the user."""
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if not ids:
        raise ValueError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if max_model_len - len(ids) < 1:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but this model's context holds {max_model_len} "
            f"(prompt plus at least one generated token)"
        )


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        info = read_model_info(config.model, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.detokenizer = Detokenizer(self.tokenizer)
        shape = info.shape
        max_len = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        if shape.sliding_window:  # keep attention exact: never exceed the window we do not implement
            max_len = min(max_len, shape.sliding_window)
        self.runner = ModelRunner(config, info, max_len)
        # one sequence alone must always fit in the cache, or it could never finish
        self.max_model_len = min(max_len, self.runner.num_gpu_blocks * config.block_size)
        self.vocab_size = shape.vocab_size
        self.grammars = Grammars(self.tokenizer, self.vocab_size)
        self.eos_token_ids = set(info.eos_token_ids)
        self.block_manager = BlockManager(
            self.runner.num_gpu_blocks, config.block_size, config.enable_prefix_caching, self.runner.num_cpu_blocks
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ahead: tuple[SchedulerOutput, LaunchedStep] | None = None  # a step launched before its turn
        self.num_steps_ahead = 0

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
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
        text, ids = tokenize_prompt(self.tokenizer, prompt)
        check_request(ids, params, self.vocab_size, self.max_model_len)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, text, ids, params, arrival_time=arrival)
        req.seqs = [Sequence(request_id, i, ids, params, max_tokens, priority, arrival) for i in range(params.n)]
        if params.grammar is not None:  # compiled once; siblings (n > 1) start from copies
            first = self.grammars.matcher(params.grammar)
            for s in req.seqs:
                s.matcher = first if s.index == 0 else first.deep_copy()
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

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> None:
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

    def shutdown(self) -> None:
        """Stop the model's other tensor-parallel ranks, if any (also done when the engine is collected)."""
        self.runner.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.swapped)

    def snapshot(self) -> EngineSnapshot:
        bm = self.block_manager
        arrivals = [s.arrival_time for s in self.scheduler.waiting if s.first_scheduled_time is None]
        return EngineSnapshot(
            self.num_running,
            self.num_waiting,
            bm.usage,
            bm.prefix_cache_queries,
            bm.prefix_cache_hits,
            self.scheduler.num_preemptions,
            self.stats.prompt_tokens,
            self.stats.generation_tokens,
            min(arrivals, default=None),
        )

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and report every request that changed."""
        return [req.output() for req in self.step_requests()]

    def step_requests(self) -> list[Request]:
        """One step; the requests that changed (finished ones are no longer tracked afterwards). Callers
        that need only deltas or final outputs use this and skip copying every output every step.

        With async scheduling, the next decode step is launched before this step's tokens reach the host,
        so the device never waits for the host's bookkeeping (see _launch_ahead)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not all(seq.is_finished for seq, _ in ahead[0].scheduled):
            out, launched = ahead
        else:  # nothing launched ahead, or everything it ran has ended since (then it is dropped)
            out = self.scheduler.schedule()
            launched = self.runner.launch(out)
        if self.config.async_scheduling:
            self._ahead = self._launch_ahead(out, launched)
        sampled, tokens, logprobs = self.runner.collect(launched)
        if self._ahead is not None or any(s.is_finished for s in sampled):
            # a step launched ahead also ran rows whose sequence has ended since (its length, an abort, a
            # stop): their results are dropped
            live = [i for i, s in enumerate(sampled) if not s.is_finished]
            sampled, tokens, logprobs = ([x[i] for i in live] for x in (sampled, tokens, logprobs))
        touched: dict[str, None] = dict.fromkeys(s.request_id for s in out.timed_out)
        now = time.monotonic()
        for seq, n in out.scheduled:
            if seq.is_finished:
                continue
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)
        for seq, token, lp in zip(sampled, tokens, logprobs):
            seq.append_token(token)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
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
            results.append(req)
            if req.finished:
                del self.requests[request_id]
        return results

    def _launch_ahead(
        self, out: SchedulerOutput, launched: LaunchedStep
    ) -> tuple[SchedulerOutput, LaunchedStep] | None:
        """Launch the step after `launched` now, while it runs, when the scheduler could only repeat it: every
        row sampled (so each continues with one decode), nobody waiting or swapped out, no penalties (they
        need the token being sampled). Rows of sequences that end with the running step's token (their
        length) compute nothing; any that end otherwise (EOS, a stop string, an abort) are dropped when
        collected. Blocks freed meanwhile are reused only by steps queued later on the same stream."""
        sch = self.scheduler
        seqs = launched.sampling
        if not seqs or len(seqs) != len(out.scheduled) or sch.waiting or sch.swapped:
            return None
        keep = [i for i, s in enumerate(seqs) if not s.is_finished]
        if not keep or any(seqs[i].params.has_penalties or seqs[i].matcher is not None for i in keep):
            return None  # both need the token being sampled
        in_flight = {id(seq): n for seq, n in out.scheduled}  # tokens the running step computes per sequence
        positions: list[int | None] = []
        for i in keep:
            seq = seqs[i]
            n = in_flight[id(seq)]
            ends = seq.num_output_tokens + 1 >= seq.max_tokens or len(seq) + 1 >= self.max_model_len
            if ends:
                positions.append(None)
            elif self.block_manager.allocate(seq, n + 1):
                positions.append(seq.num_computed_tokens + n)
            else:  # out of blocks: the scheduler decides (preemption) next step
                return None
        if all(p is None for p in positions):  # every sequence ends with the running step
            return None
        ahead = self.runner.launch_ahead(launched, keep, positions)
        self.num_steps_ahead += 1
        return SchedulerOutput(scheduled=[(seqs[i], 1) for i in keep]), ahead

    def _check_finished(self, seq: Sequence, token: int, text_before: int) -> None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop")
        elif token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif p.stop and p.detokenize and self._check_stop_strings(seq, text_before):
            return
        elif seq.matcher is not None and (seq.matcher.is_stopped() or seq.matcher.is_error()):
            self._finish(seq, "stop")  # the grammar is complete (or, never expected, broken): nothing may follow
        elif seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.params.detokenize:
            self.detokenizer.flush(seq, seq.params.skip_special_tokens)
        if reason == "stop" and stop_reason is None and seq.params.detokenize and seq.params.stop:
            self._check_stop_strings(seq)
        if not seq.is_finished:
            seq.finish(reason, stop_reason)

    def _detokenize(self, seqs: list[Sequence]) -> dict[int, int]:
        """Append each sequence's newly complete text, batched over the step; returns each sequence's text
        length before."""
        before = {s.seq_id: len(s.text) for s in seqs}
        self.detokenizer.advance(seqs, [s.params.skip_special_tokens for s in seqs])
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
