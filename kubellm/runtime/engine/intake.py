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


def make_submission(
    tokenizer,
    vocab_size: int,
    max_model_len: int,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    priority: int = 0,
    arrival_time: float | None = None,
) -> Submission:
    """Tokenize and validate; raises ValueError with a message for the user."""
    text, ids = tokenize_prompt(tokenizer, prompt)
    check_request(ids, params, vocab_size, max_model_len)
    arrival = time.monotonic() if arrival_time is None else arrival_time
    return Submission(EngineRequest(request_id, ids, params, priority, arrival), text)
