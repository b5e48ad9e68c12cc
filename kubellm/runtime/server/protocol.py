"""OpenAI-compatible request and response bodies (pydantic: the single source of truth for the HTTP schema).

Unknown fields are accepted and ignored, as vLLM does, so newer SDKs keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubellm.runtime.sampling_params import MAX_LOGPROBS
from kubellm.runtime.server.protocol_tools import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    Tool,
    ToolCall,
    ToolChoice,
    forced_call_schema,
    legacy_functions_as_tools,
)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage (so far) on every chunk too


def _off(value) -> bool:
    return value in (None, False, "none", [], {})


# Fields of OpenAI's or vLLM's API that change what a correct answer is, and that this server does not
# implement: refused with a 400 naming the field (unknown fields are otherwise ignored), so nobody asking for
# a tool call gets free text back. name → whether a value asks for nothing.
UNSUPPORTED_FIELDS = {
    "tools": _off,
    "functions": _off,
    "tool_choice": lambda v: _off(v) or v == "auto",
    "function_call": lambda v: _off(v) or v == "auto",
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": _off,  # vLLM's beam search: not implemented
}


def unsupported_field(req: BaseModel) -> str | None:
    """The first field of UNSUPPORTED_FIELDS that the request sets to something it asks for, if any."""
    handled = getattr(req, "handled_extras", frozenset())
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED_FIELDS and name not in handled and not UNSUPPORTED_FIELDS[name](value):
            return name
    return None


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI's structured output: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(OpenAIModel):
    """vLLM's newer spelling of the guided_* fields (`structured_outputs` in the request)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
INT32_MAX, INT64_MIN, INT64_MAX = 2**31 - 1, -(2**63), 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # and below the vocabulary size (checked at intake)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # token id (a JSON key, so a string of digits) → bias added to its logit; at most 300 entries, which bounds
    # what one request adds to every step of the batch it runs in
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=300)
    user: str | None = None
    # vLLM extensions (the openai SDK sends them through extra_body)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # more than the vocabulary: all of it
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    min_tokens: int = Field(
        0, ge=0, le=INT32_MAX, description="EOS and stop_token_ids are masked until this many tokens"
    )
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, le=INT32_MAX, description="keep the prompt's last k tokens (-1: context)"
    )
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    # structured output: OpenAI's response_format, or vLLM's guided_* extras (at most one of them)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, description="a Lark grammar")
    structured_outputs: StructuredOutputs | None = None

    def structured_output(self) -> tuple[str, str, Any] | None:
        """(field, kind, spec) of the structured output asked for, if any (kinds: engine/guided.py)."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            schema = {"type": "object"} if rf.type == "json_object" else rf.json_schema.schema_
            asked.append(("response_format", "json", schema))
        for name, kind in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "lark"),
        ):
            if getattr(self, name) is not None:
                asked.append((name, kind, getattr(self, name)))
        so = self.structured_outputs
        if so is not None:
            for key, kind, value in (
                ("json", "json", so.json_),
                ("regex", "regex", so.regex),
                ("choice", "choice", so.choice),
                ("grammar", "lark", so.grammar),
            ):
                if value is not None:
                    asked.append((f"structured_outputs.{key}", kind, value))
        if len(asked) > 1:
            raise ValueError(f"ask for one structured output at a time, not {' and '.join(a[0] for a in asked)}")
        return asked[0] if asked else None

    @model_validator(mode="after")
    def _check_common(self):
        self.structured_output()
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise ValueError("stop strings must not be empty")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("at most 16 stop strings")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    # OpenAI's and vLLM's default; null: what the context leaves; 0 only with echo (score the prompt)
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_prompt(self):
        if (
            self.prompt == ""
            or self.prompt == []
            or (isinstance(self.prompt, list) and any(p in ("", []) for p in self.prompt))
        ):
            raise ValueError("prompt must not be empty")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result's call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def _check_continuation(req) -> None:
    if req.continue_final_message and req.add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="the answer continues the last (assistant) message")
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = Field(False, description="vLLM: the answer starts with the last message if it is the assistant's")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: bool = True
    # OpenAI's legacy function calling, read as tools (protocol_tools.py: legacy_functions_as_tools)
    handled_extras: ClassVar[frozenset[str]] = frozenset({"functions", "function_call"})

    @model_validator(mode="before")
    @classmethod
    def _legacy_functions(cls, data):
        return legacy_functions_as_tools(data)

    @property
    def legacy_functions(self) -> bool:
        """Asked with OpenAI's deprecated `functions`: answered with `function_call`, not `tool_calls`."""
        return bool((self.model_extra or {}).get("functions"))

    def structured_output(self) -> tuple[str, str, Any] | None:
        """A forced tool call (tool_choice "required" or a named function) is a JSON schema's grammar."""
        asked = super().structured_output()
        forced = forced_call_schema(self.tools or [], self.tool_choice or "auto", self.parallel_tool_calls)
        if forced is None:
            return asked
        if asked is not None:
            raise ValueError(f"ask for one structured output at a time, not tool_choice and {asked[0]}")
        return ("tools", "json", forced)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        _check_continuation(self)
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template (what the chat endpoint
    would feed the model)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        _check_continuation(self)
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kubellm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)
    max_model_len: int | None = None
    vocab_size: int | None = None


class LoadLoraAdapterRequest(OpenAIModel):
    """vLLM's /v1/load_lora_adapter (with --allow-runtime-lora-updating): a PEFT adapter directory."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1, max_length=256)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one token's logprob, its rank in the distribution (1: the most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, token id → its Logprob (the prompt's own token and the top ones);
# None for the first token, which nothing predicts
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids
    token_ids: list[int] | None = None  # return_token_ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # the legacy `functions` request's answer
    reasoning_content: str | None = None  # --reasoning-parser: the thinking block (vLLM's older name)
    reasoning: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunctionCall | None = None  # the legacy `functions` request's answer


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: on the first chunk
