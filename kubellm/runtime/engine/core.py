"""EngineCore: requests in (token ids, already validated), one step at a time over the scheduler and the model
runner, token deltas out. No text: detokenization and stop strings are the frontend's (output.py). The
server runs it in its own process (async_engine.py); LLMEngine (engine.py) runs it in the caller's."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.guided import Grammars, grammar_failure
from kubellm.runtime.engine.intake import check_params
from kubellm.runtime.engine.lora import LoraManager
from kubellm.runtime.engine.runner import LaunchedStep, ModelRunner
from kubellm.runtime.engine.scheduler import Scheduler, SchedulerOutput
from kubellm.runtime.engine.sequence import Sequence
from kubellm.runtime.engine.speculation import SpecDecodeStats, can_speculate
from kubellm.runtime.engine.wire import (
    EngineInfo,
    EngineRequest,
    EngineSnapshot,
    LoadLora,
    LoraReply,
    RequestDelta,
    UnloadLora,
)
from kubellm.runtime.model.loader import read_model_info
from kubellm.runtime.model.lora import LoraError, LoraNotLoaded
from kubellm.settings import EngineConfig


@dataclass
class CoreRequest:
    request_id: str
    seqs: list[Sequence] = field(default_factory=list)

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

    def delta(self) -> RequestDelta:
        first = self.seqs[0]
        prompt_logprobs = None
        if first.prompt_logprobs is not None and not first.prompt_logprobs_sent and not first.needs_prompt_logprobs:
            prompt_logprobs, first.prompt_logprobs_sent = first.prompt_logprobs, True
        return RequestDelta(
            self.request_id,
            self.finished,
            first.num_cached_tokens,
            first.first_scheduled_time,
            self.first_token_time,
            [s.take_delta() for s in self.seqs],
            prompt_logprobs,
        )


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # computed prompt tokens (prefix-cache hits excluded)
    generation_tokens: int = 0
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)


def model_limits(config: EngineConfig) -> tuple:
    """(model info, the longest sequence the model itself allows) before any memory is planned."""
    info = read_model_info(config.model, config.dtype)
    shape = info.shape
    max_len = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
    if shape.sliding_window:  # keep attention exact: never exceed the window we do not implement
        max_len = min(max_len, shape.sliding_window)
    return info, max_len


class EngineCore:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        info, max_len = model_limits(config)
        self.runner = ModelRunner(config, info, max_len)
        # one sequence alone must always fit in the cache, or it could never finish
        self.max_model_len = min(max_len, self.runner.num_gpu_blocks * config.block_size)
        self.vocab_size = info.shape.vocab_size
        # grammars are compiled against the tokenizer's vocabulary; nothing else here reads text
        self.grammars = Grammars(AutoTokenizer.from_pretrained(config.model), self.vocab_size)
        self.eos_token_ids = set(info.eos_token_ids)
        self.block_manager = BlockManager(
            self.runner.num_gpu_blocks, config.block_size, config.enable_prefix_caching, self.runner.num_cpu_blocks
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, CoreRequest] = {}
        # request id -> why, for requests whose grammar rejected the token drawn under its own mask; they end
        # with that error (take_failures), not as if the output were complete
        self._failures: dict[str, str] = {}
        self.stats = EngineStats()
        self._ahead: tuple[SchedulerOutput, LaunchedStep] | None = None  # a step launched before its turn
        self._current: SchedulerOutput | None = None  # the step being run (fail_step ends its requests)
        self.num_steps_ahead = 0
        self.loras: LoraManager | None = None
        if self.runner.lora is not None:
            self.loras = LoraManager(self.runner.lora)
            for name, path in config.lora_module_paths().items():
                self.loras.load(name, path)

    def info(self) -> EngineInfo:
        loras = {a.name: a.path for a in self.loras.adapters.values()} if self.loras else {}
        return EngineInfo(
            self.max_model_len, self.vocab_size, self.runner.num_gpu_blocks, str(self.runner.device), loras
        )

    # ------------------------------------------------------------------ LoRA adapters
    def lora_op(self, op: LoadLora | UnloadLora) -> LoraReply:
        """Load or unload an adapter; the reply says why not (and the field at fault) when it cannot be."""
        try:
            if self.loras is None:
                raise LoraError("LoRA adapters are off: start the server with --enable-lora", "model")
            if isinstance(op, LoadLora):
                self.loras.load(op.lora_name, op.lora_path)
            else:
                adapter = self.loras.adapters.get(op.lora_name)
                in_use = 0
                if adapter is not None:
                    queues = (self.scheduler.running, self.scheduler.waiting, self.scheduler.swapped)
                    in_use = sum(1 for q in queues for seq in q if seq.lora_slot == adapter.slot)
                self.loras.unload(op.lora_name, in_use)
        except LoraError as e:
            return LoraReply(op.op_id, str(e), e.field, isinstance(e, LoraNotLoaded))
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # an unreadable or malformed adapter
            return LoraReply(op.op_id, f"the adapter could not be loaded: {type(e).__name__}: {e}", "lora_path")
        return LoraReply(op.op_id)

    # ------------------------------------------------------------------ intake
    def add(self, req: EngineRequest) -> None:
        """Queue a request the frontend validated (intake.py). Raises ValueError for a request id in use."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        ids, params = req.prompt_token_ids, req.params
        check_params(ids, params, req.priority, self.vocab_size)  # what the step cannot take fails here, not there
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        adapter = None
        if req.lora_name is not None:
            if self.loras is None:
                raise LoraError("LoRA adapters are off: start the server with --enable-lora", "model")
            adapter = self.loras.get(req.lora_name)  # unloaded since the frontend looked: refused
        core_req = CoreRequest(req.request_id)
        core_req.seqs = [
            Sequence(req.request_id, i, ids, params, max_tokens, req.priority, req.arrival_time)
            for i in range(params.n)
        ]
        if adapter is not None:
            for s in core_req.seqs:
                s.lora_slot, s.lora_id = adapter.slot, adapter.load_id
        if params.min_tokens:  # vLLM: EOS (unless ignored) and the stop tokens wait for min_tokens
            ban = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids))
            for s in core_req.seqs:
                s.min_tokens_ban = ban or None
        if params.grammar is not None:  # compiled once; siblings (n > 1) start from copies
            first = self.grammars.matcher(params.grammar)
            for s in core_req.seqs:
                s.matcher = first if s.index == 0 else first.deep_copy()
        if self.config.enable_prefix_caching:
            for s in core_req.seqs[1:]:
                s.prefix_source = core_req.seqs[0]
        self.requests[req.request_id] = core_req
        for seq in core_req.seqs:
            self.scheduler.add(seq)

    def fail_step(self) -> list[str]:
        """The step being run raised (engine/async_engine.py reports it and gives up after a few in a row): end
        the requests that may have caused it and return their ids. The suspects are the step's requests
        without a token yet (a request that has run before is unlikely to be the cause); if there are none,
        every request of the step. Requests outside it, and others in it, run again in the next step."""
        ahead, self._ahead = self._ahead, None
        current, self._current = self._current, None
        if current is None:  # failed while scheduling: any request may be the cause
            ids = list(self.requests)
        else:
            scheduled = current.scheduled + (ahead[0].scheduled if ahead is not None else [])
            ids = list(dict.fromkeys(seq.request_id for seq, _ in scheduled if not seq.is_finished))
            new = [i for i in ids if i in self.requests and not any(s.num_output_tokens for s in self.requests[i].seqs)]
            ids = new or ids
        for request_id in ids:
            self.abort(request_id)
            self.requests.pop(request_id, None)
        return ids

    def take_failures(self) -> list[tuple[str, str]]:
        """(request id, why) of the requests the last step ended with an error; each is reported once."""
        failures, self._failures = list(self._failures.items()), {}
        return failures

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request, or one of its sequences (the frontend found its stop string); frees their blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished and (index is None or seq.index == index):
                self.scheduler.remove(seq)
                seq.finish("abort")
        if req.finished:
            del self.requests[request_id]

    def shutdown(self) -> None:
        """Stop the model's other tensor-parallel ranks, if any (also done when the core is collected)."""
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
        spec = self.stats.spec
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
            *self._lora_usage(),
            spec.num_drafts,
            spec.num_draft_tokens,
            spec.num_accepted_tokens,
            list(spec.accepted_per_position),
            self.runner.kv_cache_bytes,
            *self.runner.device_memory(),
        )

    def _lora_usage(self) -> tuple[list[str], list[str]]:
        """The adapters of the running sequences, and of the waiting and swapped ones (vllm:lora_requests_info)."""
        if self.loras is None or not self.loras.adapters:
            return [], []
        sch = self.scheduler
        waiting = [s.lora_slot for q in (sch.waiting, sch.swapped) for s in q]
        return self.loras.names(s.lora_slot for s in sch.running), self.loras.names(waiting)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestDelta]:
        """Schedule, run the model once, and report every request that changed (finished ones are no longer
        tracked afterwards).

        With async scheduling, the next decode step is launched before this step's tokens reach the host,
        so the device never waits for the host's bookkeeping (see _launch_ahead)."""
        self._current = None
        out, launched = self._next_step()
        self._current = out
        if self.config.async_scheduling:
            self._ahead = self._launch_ahead(out, launched)
        sampled, tokens, logprobs = self.runner.collect(launched)
        touched: dict[str, None] = dict.fromkeys(s.request_id for s in out.timed_out)
        if launched.accepted is not None:
            self._take_drafts(out, launched.accepted, touched)
        if self._ahead is not None or any(s.is_finished for s in sampled):
            # a step launched ahead also ran rows whose sequence has ended since (its length, an abort, a
            # stop): their results are dropped
            live = [i for i, s in enumerate(sampled) if not s.is_finished]
            sampled, tokens, logprobs = ([x[i] for i in live] for x in (sampled, tokens, logprobs))
        self._account_computed(out)
        now = time.monotonic()
        for seq, token, lp in zip(sampled, tokens, logprobs):
            seq.append_token(token)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if lp is not None:
                seq.logprobs.append(lp)
            touched[seq.request_id] = None
            self._check_finished(seq, token)
        self.stats.generation_tokens += len(sampled)
        deltas = []
        for request_id in touched:
            req = self.requests.get(request_id)
            if req is None:
                continue
            if request_id in self._failures:
                self.abort(request_id)
                continue
            deltas.append(req.delta())
            if req.finished:
                del self.requests[request_id]
        return deltas

    def _next_step(self) -> tuple[SchedulerOutput, LaunchedStep]:
        """The step launched ahead last time, unless everything it ran has ended since (then it is dropped);
        otherwise a newly scheduled one, launched now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not all(seq.is_finished for seq, _ in ahead[0].scheduled):
            return ahead
        out = self.scheduler.schedule()
        return out, self.runner.launch(out)

    def _take_drafts(self, out: SchedulerOutput, accepted: dict[int, list[int]], touched: dict[str, None]) -> None:
        """Append each speculating sequence's accepted draft tokens (before its step's own token, which the
        caller appends), stopping where one ends the sequence; a step computed the KV of the last token and
        the accepted ones only, so that is what it counts."""
        now = time.monotonic()
        scheduled = []
        for seq, n in out.scheduled:
            draft = seq.draft_token_ids
            if draft and seq.seq_id in accepted:
                taken = accepted[seq.seq_id]
                self.stats.spec.record(len(draft), len(taken))
                n = 1 + len(taken)
                for token in taken:
                    if seq.is_finished:
                        break
                    seq.append_token(token)
                    if seq.first_token_time is None:
                        seq.first_token_time = now
                    self.stats.generation_tokens += 1
                    touched[seq.request_id] = None
                    self._check_finished(seq, token)
                seq.draft_token_ids = []
            scheduled.append((seq, n))
        out.scheduled = scheduled

    def _account_computed(self, out: SchedulerOutput) -> None:
        for seq, n in out.scheduled:
            if seq.is_finished:
                continue
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)

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
        if not keep or any(
            seqs[i].params.has_penalties or seqs[i].matcher is not None or seqs[i].restricted for i in keep
        ):
            return None  # they need the token being sampled (min_tokens counts it)
        if sch.speculative is not None and any(can_speculate(seqs[i]) for i in keep):
            return None  # its draft is looked up in the tokens being sampled
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

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop")
        elif token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif seq.matcher is not None and seq.matcher.is_error():
            self._failures[seq.request_id] = grammar_failure(seq.matcher.get_error())
        elif seq.matcher is not None and seq.matcher.is_stopped():
            self._finish(seq, "stop")  # the grammar is complete: nothing may follow
        elif seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_token: int | None = None) -> None:
        seq.finish(reason, stop_token)
        self.scheduler.remove(seq)
