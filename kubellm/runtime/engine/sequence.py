"""Sequence: one generation stream of the engine core, its tokens and where its KV lives."""

from __future__ import annotations

import enum
import itertools
import time

from kubellm.runtime.engine.wire import CompletionDelta, TokenLogprob
from kubellm.runtime.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    """One stream of tokens: the prompt plus what has been generated, and where its KV lives."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache at admission
        self.block_table: list[int] = []
        self.draft_token_ids: list[int] = []  # speculated tokens this step verifies after the last token
        self.cpu_block_table: list[int] = []  # where its KV sits while swapped out
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks, in order
        self.num_published_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # prompt_logprobs (the request's first sequence only): entry k is prompt token k + 1's, from position k
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [] if params.prompt_logprobs is not None and index == 0 else None
        )
        self.prompt_logprobs_sent = False
        self.min_tokens_ban: list[int] | None = None  # token ids masked until min_tokens (set by the core)
        self.restricted = params.allowed_token_ids is not None or params.min_tokens > 0  # the sampler masks
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.prefix_source: Sequence | None = None  # sibling (n > 1) whose prompt blocks this one waits to share
        self.lora_slot = 0  # the LoRA adapter's device slot (engine/lora.py); 0: the base model
        self.lora_id = 0  # that adapter's load id: where its prefix-cache hash chain starts
        self.matcher = None  # llguidance matcher following this sequence's output (a guided request)
        # how much of the output the last delta carried
        self.sent_tokens = self.sent_logprobs = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: its prompt positions must run (no prefix-cache hits)."""
        pl = self.prompt_logprobs
        return pl is not None and len(pl) < self.num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Lower sorts first: higher priority (smaller number), then earlier arrival."""
        return (self.priority, self.arrival_time, self.seq_id)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: str, stop_reason: int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def take_delta(self) -> CompletionDelta:
        """The output since the previous call. Runs for every sequence every step: no property calls."""
        logprobs = self.logprobs
        delta = CompletionDelta(
            self.index,
            self.token_ids[self.num_prompt_tokens + self.sent_tokens :],
            None if logprobs is None else logprobs[self.sent_logprobs :],
            self.finish_reason,
            self.stop_reason,
        )
        self.sent_tokens = len(self.token_ids) - self.num_prompt_tokens
        if logprobs is not None:
            self.sent_logprobs = len(logprobs)
        return delta
