"""The messages between the frontend (the server process, or LLMEngine in one process) and the engine core.

Typed msgspec structs, encoded as MessagePack arrays (array_like: no field names on the wire) and exempt from
the garbage collector (gc=False: they hold no cycles). A step of 256 running requests is one StepOutput;
`bench/wire.py` measures its encode + decode cost against pickled positional tuples.

    frontend ──[EngineRequest | Abort | LoadLora | UnloadLora | Shutdown, batched]──► engine core
    frontend ◄──[Ready | Failed, then StepOutput per step | Dead]── engine core

A LoadLora or UnloadLora is answered by a LoraReply in the next StepOutput.

The core sees token ids only: detokenization and stop strings are the frontend's (output.py), which aborts a
sequence in the core when its text hits a stop string.
"""

from __future__ import annotations

import msgspec

from kubellm.runtime.sampling_params import SamplingParams


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first
    rank: int | None = None  # the token's rank (1: the most likely); prompt logprobs only


# ---------------------------------------------------------------------- frontend → core
class EngineRequest(msgspec.Struct, array_like=True, gc=False, tag="add"):
    """A request tokenized and validated by the frontend (intake.py); the core trusts it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0  # time.monotonic() at intake: queue time and queue timeouts count from here
    lora_name: str | None = None  # the LoRA adapter this request runs with; None: the base model


class Abort(msgspec.Struct, array_like=True, gc=False, tag="abort"):
    request_id: str
    index: int | None = None  # one sequence of an n > 1 request (its stop string matched); None: all of it


class Shutdown(msgspec.Struct, array_like=True, tag="stop"):
    pass


class LoadLora(msgspec.Struct, array_like=True, tag="load_lora"):
    op_id: str
    lora_name: str
    lora_path: str


class UnloadLora(msgspec.Struct, array_like=True, tag="unload_lora"):
    op_id: str
    lora_name: str


ToCore = EngineRequest | Abort | LoadLora | UnloadLora | Shutdown


# ---------------------------------------------------------------------- core → frontend
class CompletionDelta(msgspec.Struct, array_like=True, gc=False):
    """One sequence's tokens since the previous delta."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout" | None while running
    stop_reason: int | None  # the stop token that ended it (stop strings are the frontend's)


class RequestDelta(msgspec.Struct, array_like=True, gc=False):
    request_id: str
    finished: bool  # every sequence has finished in the core
    num_cached_tokens: int
    first_scheduled_time: float | None
    first_token_time: float | None
    outputs: list[CompletionDelta]
    # the request's prompt_logprobs, once (with its first token): one per prompt token after the first
    prompt_logprobs: list[TokenLogprob] | None = None


class EngineSnapshot(msgspec.Struct, array_like=True, gc=False):
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
    running_loras: list[str] = []  # LoRA adapters of the running sequences (with --enable-lora)
    waiting_loras: list[str] = []  # and of the waiting ones
    # speculative decoding (vLLM's spec_decode counters): drafts, their tokens, accepted tokens (per position)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = msgspec.field(default_factory=list)
    # memory: the KV cache's tensor (bytes held for it on its device: this rank's share with tensor parallelism),
    # and the device's memory in use and in total as the driver reports it (every process on it; read at most
    # once a second); None on a CPU, which has no device memory of its own to report
    kv_cache_bytes: int = 0
    device_memory_used_bytes: int | None = None
    device_memory_total_bytes: int | None = None


class LoraReply(msgspec.Struct, array_like=True):
    """The answer to a LoadLora / UnloadLora: error None when it was done; else why, and the field at fault."""

    op_id: str
    error: str | None = None
    field: str | None = None
    not_loaded: bool = False  # the error is that no adapter of that name is loaded


class EngineInfo(msgspec.Struct, array_like=True):
    max_model_len: int
    vocab_size: int
    num_gpu_blocks: int
    device: str
    loras: dict[str, str] = {}  # the LoRA adapters loaded at start: name → path


class StartRefused(msgspec.Struct, array_like=True, tag="refused"):
    """The core will not start, for a reason the operator shows as it is (kubellm/fit.py: the model does not
    fit): no traceback, and the pod should not be restarted into the same refusal."""

    reason: str
    message: str
    termination_message: str  # for the container's termination-message file (kubellm/fit.py)


class Ready(msgspec.Struct, array_like=True, tag="ready"):
    info: EngineInfo


class Failed(msgspec.Struct, array_like=True, tag="failed"):
    """The core could not start (the model did not load)."""

    traceback: str


class Dead(msgspec.Struct, array_like=True, tag="dead"):
    """The core's step loop raised: every request in flight fails."""

    traceback: str


class StepOutput(msgspec.Struct, array_like=True, gc=False, tag="step"):
    deltas: list[RequestDelta]
    errors: list[tuple[str, str]]  # (request_id, why the core refused it)
    snapshot: EngineSnapshot
    num_added: int  # sequences (prompts × n) taken in so far (refused ones included)
    failed: list[tuple[str, str]] = []  # (request_id, why): a step running it raised; the engine goes on
    lora_replies: list[LoraReply] = []


FromCore = Ready | Failed | StartRefused | Dead | StepOutput

encode = msgspec.msgpack.Encoder().encode
decode_to_core = msgspec.msgpack.Decoder(list[ToCore]).decode
decode_from_core = msgspec.msgpack.Decoder(FromCore).decode
