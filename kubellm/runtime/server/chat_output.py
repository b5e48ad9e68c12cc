"""Chat requests with tools or a reasoning parser: what the chat template receives (tools, tool calls and tool
results in the history), which parser reads the answer, and the answer as a message (non-streamed) or as deltas
(streamed). Both come from the same parse of the text, so a stream assembles to exactly the non-streamed answer."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.errors import ApiError
from kubellm.runtime.server.protocol_tools import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from kubellm.runtime.server.reasoning import REASONING_PARSERS, ReasoningParser
from kubellm.runtime.server.tool_calls import PARSERS, NamedParser, Parsed, RequiredParser, ToolParser

log = logging.getLogger("kubellm.server")
_warned_templates: set[int] = set()


# ------------------------------------------------------------------ the prompt
def template_messages(req) -> list[dict]:
    """The messages as chat templates read them: null content as "", tool calls with their arguments as an
    object (templates write `arguments | tojson`), tool results with their call's id (400 for an id no earlier
    assistant message called)."""
    called: set[str] = set()
    out = []
    for i, m in enumerate(req.messages):
        d: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in m.tool_calls
            ]
            called.update(c.id for c in m.tool_calls)
        if m.role == "tool":
            if m.tool_call_id is not None and m.tool_call_id not in called:
                raise ApiError(
                    400,
                    f"messages.{i}.tool_call_id: {m.tool_call_id!r} matches no earlier assistant tool call",
                    param=f"messages.{i}.tool_call_id",
                )
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


def _args(call: ToolCall):
    try:
        value = json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments
    return value if isinstance(value, dict) else call.function.arguments


def template_tools(req, tokenizer) -> list[dict] | None:
    """The tools the template gets (none when tool_choice is "none"); logs once per template that ignores them."""
    tools = getattr(req, "tools", None)
    if not tools or getattr(req, "tool_choice", None) == "none":
        return None
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "tools" not in template and id(template) not in _warned_templates:
        _warned_templates.add(id(template))
        log.warning("the chat template does not mention tools: they are not in the prompt")
    return [t.model_dump(exclude_none=True) for t in tools]


# ------------------------------------------------------------------ the answer
def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


@dataclass
class Split:
    reasoning: str | None
    content: str
    calls: list  # tool_calls.Call: complete or in progress
    valid: bool  # the calls may be the answer (final: finish_reason "tool_calls")


class ChatOutput:
    """How one chat request's generated text becomes an assistant message."""

    def __init__(
        self,
        tools: ToolParser | None = None,
        reasoning: ReasoningParser | None = None,
        parallel: bool = True,
        legacy: bool = False,
    ):
        self.tools, self.reasoning = tools, reasoning
        # parallel_tool_calls false: only the first call is answered (vLLM's maybe_filter_parallel_tool_calls);
        # a forced call's grammar already allows one only
        self.parallel = parallel
        # asked with the legacy `functions`: the (one) call is `function_call`, finish_reason "function_call"
        self.legacy = legacy

    @classmethod
    def for_request(cls, req: p.ChatCompletionRequest, config) -> ChatOutput:
        reasoning = None
        kwargs = req.chat_template_kwargs or {}
        if config.reasoning_parser and kwargs.get("enable_thinking", True) is not False:
            reasoning = REASONING_PARSERS[config.reasoning_parser]()
        legacy = getattr(req, "legacy_functions", False)
        return cls(tool_parser(req, config), reasoning, req.parallel_tool_calls and not legacy, legacy)

    @property
    def plain(self) -> bool:
        return self.tools is None and self.reasoning is None

    def split(self, text: str, final: bool) -> Split:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, final)
        if self.tools is None:
            return Split(reasoning, text, [], False)
        parsed: Parsed = self.tools.parse(text, final)
        forced = isinstance(self.tools, NamedParser | RequiredParser)
        valid = bool(parsed.calls) and parsed.valid()
        if final and not forced and parsed.calls and not valid:  # broken calls: the text is the answer
            return Split(reasoning, text, [], False)
        content = parsed.content
        if not content.strip() and (parsed.calls or not final):  # whitespace before a call is not an answer
            content = ""
        calls = [c for c in parsed.calls if c.name is not None]
        return Split(reasoning, content, calls if self.parallel else calls[:1], valid)

    def message(self, text: str, finish_reason: str | None) -> tuple[p.AssistantMessage, str | None]:
        if self.plain:
            return p.AssistantMessage(content=text), finish_reason
        s = self.split(text, final=True)
        calls = [
            ToolCall(id=tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in s.calls
        ]
        message = p.AssistantMessage(
            content=s.content or (None if calls else ""),
            tool_calls=calls or None,
            reasoning_content=s.reasoning,
            reasoning=s.reasoning,
        )
        if self.legacy and calls:
            message.function_call, message.tool_calls = calls[0].function, None
        return message, _finish(finish_reason, s, self.legacy)

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)

    def streams(self) -> Streams:
        return Streams(self)


class Streams:
    """The choices of one stream, by index."""

    def __init__(self, output: ChatOutput):
        self.output = output
        self.choices: dict[int, ChoiceStream] = {}

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[p.DeltaMessage | None, str | None]:
        if index not in self.choices:
            self.choices[index] = ChoiceStream(self.output)
        return self.choices[index].delta(text, finish_reason)


def _finish(finish_reason: str | None, s: Split, legacy: bool = False) -> str | None:
    if finish_reason == "stop" and s.calls and s.valid:
        return "function_call" if legacy else "tool_calls"
    return finish_reason


@dataclass
class _Sent:
    name: bool = False
    arguments: int = 0
    id: str = field(default_factory=tool_call_id)


@dataclass
class ChoiceStream:
    """One streamed choice: the text so far, and what of its split has been sent."""

    output: ChatOutput
    text: str = ""
    reasoning: int = 0
    content: int = 0
    calls: list[_Sent] = field(default_factory=list)

    def delta(self, text: str, finish_reason: str | None) -> tuple[p.DeltaMessage | None, str | None]:
        """The delta for this much more text (None: nothing to send yet) and the choice's finish_reason."""
        if self.output.plain:
            return p.DeltaMessage(content=text), finish_reason
        self.text += text
        s = self.output.split(self.text, final=finish_reason is not None)
        delta = p.DeltaMessage()
        if s.reasoning is not None and len(s.reasoning) > self.reasoning:
            delta.reasoning_content = delta.reasoning = s.reasoning[self.reasoning :]
            self.reasoning = len(s.reasoning)
        if len(s.content) > self.content:
            delta.content = s.content[self.content :]
            self.content = len(s.content)
        calls = [d for i, c in enumerate(s.calls) if (d := self._call_delta(i, c)) is not None]
        if calls and self.output.legacy:  # one call at most: its name first, then its arguments in pieces
            delta.function_call = calls[0].function
        elif calls:
            delta.tool_calls = calls
        empty = delta.content is None and delta.reasoning_content is None and not calls
        return (None if empty else delta), _finish(finish_reason, s, self.output.legacy)

    def _call_delta(self, i: int, call) -> DeltaToolCall | None:
        if i == len(self.calls):
            self.calls.append(_Sent())
        sent = self.calls[i]
        new_args = call.arguments[sent.arguments :]
        if sent.name and not new_args:
            return None
        out = DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=new_args))
        if not sent.name:
            out.id, out.type, out.function.name, sent.name = sent.id, "function", call.name, True
        sent.arguments = len(call.arguments)
        return out


def tool_parser(req: p.ChatCompletionRequest, config) -> ToolParser | None:
    """The parser of this request's answer: none without tools (or with tool_choice "none"), the forced formats'
    for "required" and a named function, the server's --tool-call-parser for "auto" (400 without one)."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        return NamedParser(choice.function.name)
    if choice == "required":
        return RequiredParser()
    if not (config.enable_auto_tool_choice and config.tool_call_parser):
        raise ApiError(
            400,
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            param="tool_choice",
        )
    return PARSERS[config.tool_call_parser]()
