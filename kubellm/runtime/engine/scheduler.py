"""Scheduler: one token budget per step, shared by decodes and prefill chunks (vLLM V1's shape).

Order of work in a step: running sequences (decodes first, then unfinished prefills), then swapped-out
sequences coming back, then waiting ones. When blocks run out the newest lowest-priority running sequence
is preempted, by recompute or by swapping its KV to the CPU pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.sequence import Sequence, SequenceStatus
from kubellm.runtime.engine.speculation import can_speculate, propose_ngram
from kubellm.settings import EngineConfig


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute now)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu block, cpu block), done before swap_in
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, gpu block), done before the forward
    preempted: list[Sequence] = field(default_factory=list)
    timed_out: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.num_preemptions = 0
        self.speculative = config.speculative

    def _key(self, seq: Sequence) -> tuple:
        if self.config.scheduling_policy == "priority":
            return seq.sort_key
        return (seq.arrival_time, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whatever queue holds it and release its blocks."""
        for queue in (self.waiting, self.running, self.swapped):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free_seq(seq)

    # ------------------------------------------------------------------ preemption
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        seq.draft_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        bm = self.block_manager
        if self.config.preemption_mode == "swap" and seq.block_table and bm.can_swap_out(seq):
            out.swap_out.extend(bm.swap_out(seq))
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
        else:  # recompute: drop the KV; its prefix blocks usually come back as cache hits
            bm.free_seq(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.insert(0, seq)

    def _unschedule(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Undo this step's schedule of seq (before anything ran); returns the tokens given back."""
        for i, (s, n) in enumerate(out.scheduled):
            if s is seq:
                del out.scheduled[i]
                return n
        return 0

    # ------------------------------------------------------------------ the step
    def _expire(self, out: SchedulerOutput) -> None:
        timeout = self.config.queue_timeout_s
        if timeout is None:
            return
        now = time.monotonic()
        for seq in list(self.waiting):
            if seq.first_scheduled_time is None and now - seq.arrival_time > timeout:
                self.waiting.remove(seq)
                seq.finish("timeout")
                out.timed_out.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._expire(out)
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        now = time.monotonic()

        # 1. running: decodes first (low inter-token latency), then unfinished prefills, each in key order
        queue = sorted(self.running, key=lambda s: (len(s) - s.num_computed_tokens > 1, self._key(s)))
        self.running = []
        while queue:
            seq = queue.pop(0)
            seq.draft_token_ids = []
            num_new = min(len(seq) - seq.num_computed_tokens, budget)
            if num_new <= 0:  # out of budget this step; it keeps its blocks and runs next step
                self.running.append(seq)
                continue
            if num_new == 1 and self.speculative is not None and can_speculate(seq):
                draft = self._draft(seq, budget - 1)
                if draft and bm.allocate(seq, 1 + len(draft)):  # never preempt another sequence for a draft
                    seq.draft_token_ids = draft
                    num_new += len(draft)
            while not bm.allocate(seq, num_new):
                if queue:
                    victim = max(queue, key=self._key)
                    queue.remove(victim)
                    self._preempt(victim, out)
                else:
                    self._preempt(seq, out)
                    break
            else:
                self.running.append(seq)
                out.scheduled.append((seq, num_new))
                budget -= num_new

        # 2. swapped sequences come back, oldest first, only in a step that preempted nothing
        if self.swapped and not out.preempted:
            for seq in sorted(self.swapped, key=self._key):
                num_new = min(len(seq) - seq.num_computed_tokens, budget)
                if num_new <= 0 or len(self.running) >= self.config.max_num_seqs or not bm.can_swap_in(seq, num_new):
                    break
                self.swapped.remove(seq)
                out.swap_in.extend(bm.swap_in(seq))
                assert bm.allocate(seq, num_new)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append((seq, num_new))
                budget -= num_new

        # 3. waiting sequences, only while nothing is still swapped out (it would starve)
        if not self.swapped:
            budget = self._admit_waiting(out, budget, now)
        return out

    def _draft(self, seq: Sequence, room: int) -> list[int]:
        """The n-gram draft of a decoding sequence, cut so that accepting all of it (plus the token after)
        stays within its max_tokens (itself within the model's length) and this step's token budget."""
        spec = self.speculative
        k = min(spec.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1, room)
        return propose_ngram(seq.token_ids, k, spec.prompt_lookup_max, spec.prompt_lookup_min) if k > 0 else []

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float) -> int:
        bm = self.block_manager
        preempted_now = set(map(id, out.preempted))
        may_preempt = self.config.scheduling_policy == "priority" and not out.swap_in
        for seq in sorted(self.waiting, key=self._key):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs or id(seq) in preempted_now:
                break
            source = seq.prefix_source
            if source is not None and not source.is_finished and source.num_computed_tokens < source.num_prompt_tokens:
                continue  # an n > 1 sibling: wait for the prompt's blocks so they are shared, not recomputed
            # prompt logprobs need the prompt's logits: its positions are computed, not read from the cache
            hits = [] if seq.prompt_logprobs is not None and seq.needs_prompt_logprobs else bm.lookup_prefix(seq)
            num_new = min(len(seq) - len(hits) * bm.block_size, budget)
            admitted = bm.allocate(seq, num_new, hits)
            while not admitted and may_preempt:
                victims = [r for r in self.running if self._key(r) > self._key(seq)]
                if not victims:
                    break
                victim = max(victims, key=self._key)
                budget += self._unschedule(victim, out)
                self.running.remove(victim)
                self._preempt(victim, out)
                preempted_now.add(id(victim))
                num_new = min(len(seq) - len(hits) * bm.block_size, budget)
                admitted = bm.allocate(seq, num_new, hits)
            if not admitted:
                break
            self.waiting.remove(seq)
            seq.prefix_source = None
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            out.scheduled.append((seq, num_new))
            budget -= num_new
        return budget
