"""Intake: the one place a request is tokenized and validated, in the frontend (the server process, or the
caller's for LLMEngine), so a bad request is refused without reaching the engine core."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kubellm.runtime.engine.wire import EngineRequest
from kubellm.runtime.sampling_params import SamplingParams


@dataclass(slots=True)
class Submission:
    """A validated request: what goes to the core, and the prompt text the frontend keeps for the output."""

    request: EngineRequest
    prompt: str | None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params


def tokenize_prompt(tokenizer, prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text or as token ids."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt, add_special_tokens=True)
    return None, [int(t) for t in prompt]


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_params(ids: list[int], params: SamplingParams, priority: int, vocab_size: int) -> None:
    """Every value the core turns into tensors, generators or wire integers fits them, so that no request
    can fail inside a step (the core checks again when it adds one): a ValueError naming the field."""
    if params.top_k > vocab_size:
        params.top_k = vocab_size  # the same filter (every token kept), within any integer type
    if params.seed is not None and not INT64_MIN <= params.seed <= INT64_MAX:
        raise ValueError(f"seed must be in [-2**63, 2**63 - 1], got {params.seed}")
    if params.max_tokens is not None and params.max_tokens > INT64_MAX:
        raise ValueError(f"max_tokens must be at most 2**63 - 1, got {params.max_tokens}")
    if not INT64_MIN <= priority <= INT64_MAX:
        raise ValueError(f"priority must be in [-2**63, 2**63 - 1], got {priority}")
    if params.stop_token_ids and (min(params.stop_token_ids) < 0 or max(params.stop_token_ids) >= vocab_size):
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")
    if params.logit_bias and (min(params.logit_bias) < 0 or max(params.logit_bias) >= vocab_size):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")


def check_request(
    ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int, priority: int = 0
) -> None:
    """Refuse a request the engine could never run, with a message for the user."""
    if not ids:
        raise ValueError("the prompt is empty")
    check_params(ids, params, priority, vocab_size)
    if max_model_len - len(ids) < 1:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but this model's context holds {max_model_len} "
            f"(prompt plus at least one generated token)"
        )


def make_submission(
    tokenizer,
    vocab_size: int,
    max_model_len: int,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    priority: int = 0,
    arrival_time: float | None = None,
    lora_name: str | None = None,
) -> Submission:
    """Tokenize and validate; raises ValueError with a message for the user. lora_name: the LoRA adapter to
    run with (the core refuses one it has not loaded)."""
    text, ids = tokenize_prompt(tokenizer, prompt)
    check_request(ids, params, vocab_size, max_model_len, priority)
    arrival = time.monotonic() if arrival_time is None else arrival_time
    return Submission(EngineRequest(request_id, ids, params, priority, arrival, lora_name), text)
