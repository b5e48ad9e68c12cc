"""POST /v1/responses, stateless: the request runs as the chat request it translates to (protocol_responses.py),
and its answer comes back as output items (reasoning, message, function_call) — at once, or as the Responses
API's stream of events (response.created, output_item.added, output_text.delta, function_call_arguments.delta,
…, response.completed), each with its sequence_number. Both are built from chat_output.py's parse, so the
stream's items are the non-streamed ones."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.chat_output import ChatOutput
from kubellm.runtime.server.errors import ApiError
from kubellm.runtime.server.formatting import ChoiceDelta, StreamFormatter, usage
from kubellm.runtime.server.protocol_responses import ResponsesRequest
from kubellm.runtime.server.serving import Serving


class Event(BaseModel):
    """One streamed event: its type, sequence_number and fields, as given."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_usage(u: p.Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": (u.prompt_tokens_details or {}).get("cached_tokens", 0)},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


class Responses:
    def __init__(self, serving: Serving):
        self.s = serving

    async def create(self, request: Request):
        s = self.s
        req: ResponsesRequest = await s.admission.admit(request, ResponsesRequest)
        try:
            chat = p.ChatCompletionRequest.model_validate(req.chat_request())
        except ValidationError as e:
            err = e.errors()[0]
            raise ApiError(400, f"input: {err['msg'].removeprefix('Value error, ')}", param="input") from None
        ids = await s.builder.encode(s.builder.render_chat(chat), "input", add_special_tokens=False)
        params = await s.builder.sampling_params(chat, chat.max_tokens, None)
        requests = await s.builder.make_requests([ids], params, 0, chat.max_tokens, model=req.model)
        output = ChatOutput.for_request(chat, s.config)
        shell = ResponseShell(req, s.answered_model(req.model), _id("resp"))
        if req.stream:
            events = EventStream(shell, output)
            return await s.stream(requests, request, StreamFormatter(1, False), events.on_delta, events.completed)
        (out,) = await s.runner.collect(requests, request)
        s.runner.check_timeout(out)
        c = out.outputs[0]
        message, _ = output.message(c.text, c.finish_reason)
        items = []
        if message.reasoning_content:
            items.append(reasoning_item(_id("rs"), message.reasoning_content))
        if message.content:
            items.append(message_item(_id("msg"), message.content))
        for call in message.tool_calls or []:
            items.append(call_item(_id("fc"), call.id, call.function.name, call.function.arguments))
        return shell.body("completed", items, usage([out]), c.finish_reason)


class ResponseShell:
    """The response object around the output items: what the request asked for, status, usage."""

    def __init__(self, req: ResponsesRequest, model: str, response_id: str):
        self.req, self.model, self.id, self.created = req, model, response_id, int(time.time())

    def body(
        self, status: str, items: list[dict], u: p.Usage | None = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        req = self.req
        incomplete = finish_reason == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None,
            "output": items,
            "instructions": req.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "tool_choice": req.tool_choice
            if isinstance(req.tool_choice, str) or req.tool_choice is None
            else req.tool_choice.model_dump(),
            "parallel_tool_calls": req.parallel_tool_calls,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens,
            "text": req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}},
            "metadata": req.metadata or {},
            "store": False,
            "usage": response_usage(u) if u is not None else None,
        }


class EventStream:
    """The events of one streamed response, from the chat deltas of its one choice: an item is opened when its
    first piece arrives and closed (its .done events) when the next item opens or the answer ends."""

    def __init__(self, shell: ResponseShell, output: ChatOutput):
        self.shell, self.stream = shell, output.stream()
        self.seq = 0
        self.items: list[dict] = []  # finished items
        self.open: dict | None = None  # the item being streamed
        self.kind: tuple | None = None  # ("reasoning" | "message" | "call", call index)
        self.finish_reason: str | None = None

    def event(self, type_: str, **fields) -> Event:
        e = Event(type=type_, sequence_number=self.seq, **fields)
        self.seq += 1
        return e

    def on_delta(self, d: ChoiceDelta):
        if d.first:
            yield self.event("response.created", response=self.shell.body("in_progress", []))
            yield self.event("response.in_progress", response=self.shell.body("in_progress", []))
        if not d.content:
            return
        delta, _ = self.stream.delta(d.text, d.finish_reason)
        self.finish_reason = d.finish_reason or self.finish_reason
        if delta is None:
            return
        if delta.reasoning_content:
            yield from self._piece(("reasoning", None), delta.reasoning_content)
        if delta.content:
            yield from self._piece(("message", None), delta.content)
        for call in delta.tool_calls or []:
            yield from self._piece(("call", call.index), call.function.arguments or "", call)

    def _piece(self, kind: tuple, text: str, call=None):
        index = len(self.items)
        if kind != self.kind:
            yield from self._close()
            self.kind = kind
            if kind[0] == "reasoning":
                self.open = reasoning_item(_id("rs"), "")
                yield self.event("response.output_item.added", output_index=index, item={**self.open, "content": []})
            elif kind[0] == "message":
                self.open = message_item(_id("msg"), "", "in_progress")
                yield self.event("response.output_item.added", output_index=index, item=dict(self.open))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield self.event(
                    "response.content_part.added",
                    item_id=self.open["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            else:
                self.open = call_item(_id("fc"), call.id, call.function.name, "", "in_progress")
                yield self.event("response.output_item.added", output_index=index, item=dict(self.open))
        if not text:
            return
        item_id = self.open["id"]
        if kind[0] == "reasoning":
            self.open["content"][0]["text"] += text
            yield self.event(
                "response.reasoning_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text
            )
        elif kind[0] == "message":
            self.open["_text"] = self.open.get("_text", "") + text
            yield self.event(
                "response.output_text.delta",
                item_id=item_id,
                output_index=index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        else:
            self.open["arguments"] += text
            yield self.event("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=text)

    def _close(self):
        item, index = self.open, len(self.items)
        if item is None:
            return
        self.open, self.kind = None, None
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            yield self.event(
                "response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0, text=text
            )
        elif item["type"] == "message":
            done = message_item(item["id"], item.pop("_text", ""))
            part = done["content"][0]
            yield self.event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            )
            yield self.event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
            )
            item = done
        else:
            item["status"] = "completed"
            yield self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
                name=item["name"],
            )
        self.items.append(item)
        yield self.event("response.output_item.done", output_index=index, item=item)

    def completed(self, u: p.Usage) -> _Events:
        """After the last delta (Serving.stream's usage hook): the open item's .done events, then the response."""
        closing = list(self._close())
        body = self.shell.body("completed", self.items, u, self.finish_reason)
        # response.completed even when the status is "incomplete" (as vLLM): the SDKs' stream helpers wait for it
        return _Events(events=[*closing, self.event("response.completed", response=body)])


class _Events(BaseModel):
    """Several events where Serving.stream expects one chunk: sse() writes each as its own `data:` line."""

    events: list[Event]

    def model_dump_json(self, **kwargs) -> str:
        return "\n\ndata: ".join(e.model_dump_json(**kwargs) for e in self.events)
