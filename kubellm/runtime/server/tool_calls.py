"""Tool calls in generated text: one parser per output format (vLLM's `--tool-call-parser` names, plus the two
formats a forced call's grammar writes), all of the same shape: `parse(text, final)` reads the text generated so
far and says what is content and which calls it holds.

Every parser is prefix-stable: what it reports for a prefix of the text (content, each call's name, each call's
arguments so far) is a prefix of what it reports for the whole text. A stream sends the differences between
successive reports, so the streamed pieces assemble to exactly the non-streamed answer. A call's arguments are
the model's own JSON text of the arguments object, never re-serialized."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class Malformed(ValueError):
    """The text is not the JSON the format expects."""


@dataclass
class Call:
    name: str | None  # None until the name is complete
    arguments: str  # the arguments' JSON text so far
    done: bool = False  # the call's JSON object is complete


@dataclass
class Parsed:
    content: str
    calls: list[Call] = field(default_factory=list)
    malformed: bool = False  # a call's JSON broke off: nothing after it is read

    def valid(self) -> bool:
        """Every call complete, named, with a JSON object of arguments (what a final answer may carry)."""
        for c in self.calls:
            if not c.done or c.name is None:
                return False
            try:
                if not isinstance(json.loads(c.arguments), dict):
                    return False
            except ValueError:
                return False
        return not self.malformed


# ------------------------------------------------------------------ partial JSON
WS = " \t\r\n"
_SCALAR = set("0123456789+-.eEtruefalsn")


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """The end (exclusive) of the JSON value starting at text[i], None if the text ends first."""
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth, in_string, j = 0, False, i
        while j < len(text):
            ch = text[j]
            if in_string:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    if c not in _SCALAR:
        raise Malformed(f"unexpected {c!r} at {i}")
    j = i
    while j < len(text) and text[j] in _SCALAR:
        j += 1
    return j if j < len(text) else None  # a number may go on


def object_members(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The members of the JSON object starting at text[i] ('{'): key → (start, end or None) of the value's text,
    as far as the text goes; and the object's end (None if the text ends first)."""
    members: dict[str, tuple[int, int | None]] = {}
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "}":
            return members, j + 1
        if text[j] == ",":
            j = skip_ws(text, j + 1)
            continue
        if text[j] != '"':
            raise Malformed(f"expected a key at {j}")
        key_end = value_end(text, j)
        if key_end is None:
            break
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j == len(text):
            break
        if text[j] != ":":
            raise Malformed(f"expected ':' at {j}")
        j = skip_ws(text, j + 1)
        if j == len(text):
            members[key] = (j, None)
            break
        end = value_end(text, j)
        members[key] = (j, end)
        if end is None:
            break
        j = skip_ws(text, end)
    return members, None


def call_at(text: str, i: int, args_keys: tuple[str, ...]) -> tuple[Call, int | None]:
    """The call whose JSON object starts at text[i]: {"name": …, "arguments" (or another of args_keys): {…}}."""
    members, end = object_members(text, i)
    name = None
    if "name" in members and members["name"][1] is not None:
        name = json.loads(text[members["name"][0] : members["name"][1]])
        if not isinstance(name, str):
            raise Malformed("a call's name is not a string")
    arguments = ""
    for key in args_keys:
        if key in members:
            start, stop = members[key]
            arguments = text[start:stop] if stop is not None else text[start:]
            break
    return Call(name, arguments if name is not None else "", done=end is not None), end


def calls_in_array(text: str, i: int, args_keys: tuple[str, ...]) -> Parsed:
    """Calls in a JSON array starting at text[i] ('[')."""
    out = Parsed("")
    j = skip_ws(text, i + 1)
    try:
        while j < len(text) and text[j] != "]":
            if text[j] == ",":
                j = skip_ws(text, j + 1)
                continue
            if text[j] != "{":
                raise Malformed(f"expected an object at {j}")
            call, end = call_at(text, j, args_keys)
            out.calls.append(call)
            if end is None:
                break
            j = skip_ws(text, end)
    except Malformed:
        out.malformed = True
    return out


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of text could begin marker (kept back until the next text decides)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ------------------------------------------------------------------ parsers
class ToolParser:
    """parse(text, final) → Parsed. final: the text is complete, nothing is held back."""

    name = ""

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError


class HermesParser(ToolParser):
    """Qwen2/2.5/3, Hermes: content, then `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text, final):
        start = text.find(self.START)
        if start < 0:
            return Parsed(text if final else text[: len(text) - held_back(text, self.START)])
        out = Parsed(text[:start])
        while start >= 0:
            j = skip_ws(text, start + len(self.START))
            if j == len(text):
                break
            try:
                if text[j] != "{":
                    raise Malformed(f"expected an object at {j}")
                call, end = call_at(text, j, ("arguments", "parameters"))
            except Malformed:
                out.malformed = True
                break
            out.calls.append(call)
            if end is None:
                break
            start = text.find(self.START, end)
        return out


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2 JSON calls: the whole answer is `{"name": …, "parameters": {…}}` objects (separated by
    `;`), optionally after `<|python_tag|>`; any other answer is content."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text, final):
        body = text.lstrip(WS)
        if body.startswith(self.TAG):
            body = body[len(self.TAG) :].lstrip(WS)
        elif not final and self.TAG.startswith(body):
            return Parsed("")
        if not final and body == "":
            return Parsed("")
        if not body.startswith("{"):
            return Parsed(text)
        out, i = Parsed(""), len(text) - len(body)
        try:
            while i < len(text):
                call, end = call_at(text, i, ("parameters", "arguments"))
                out.calls.append(call)
                if end is None:
                    break
                i = skip_ws(text, end)
                if i < len(text) and text[i] == ";":
                    i = skip_ws(text, i + 1)
                if i < len(text) and text[i] != "{":
                    raise Malformed(f"expected an object at {i}")
        except Malformed:
            out.malformed = True
        return out


class MistralParser(ToolParser):
    """Mistral: content, then `[TOOL_CALLS]` and a JSON array of {"name", "arguments"} (the marker is a special
    token: with special tokens skipped, an answer that starts with `[{` is read as the array)."""

    name = "mistral"
    MARK = "[TOOL_CALLS]"

    def parse(self, text, final):
        at = text.find(self.MARK)
        if at >= 0:
            j = skip_ws(text, at + len(self.MARK))
            if j == len(text):
                return Parsed(text[:at])
            if text[j] == "{":  # a single object without the array
                return self._single(text, j, text[:at])
            out = calls_in_array(text, j, ("arguments", "parameters"))
            out.content = text[:at]
            return out
        body = text.lstrip(WS)
        if body.startswith("[{"):
            return calls_in_array(text, len(text) - len(body), ("arguments", "parameters"))
        if not final and (body in ("", "[") or self.MARK.startswith(body)):
            return Parsed("")
        if final or self.MARK[0] not in text:
            return Parsed(text)
        return Parsed(text[: len(text) - held_back(text, self.MARK)])

    @staticmethod
    def _single(text, j, content):
        out = Parsed(content)
        try:
            call, _ = call_at(text, j, ("arguments", "parameters"))
            out.calls.append(call)
        except Malformed:
            out.malformed = True
        return out


class RequiredParser(ToolParser):
    """tool_choice "required": the grammar makes the answer a JSON array of {"name", "parameters"}."""

    name = "required"

    def parse(self, text, final):
        j = skip_ws(text, 0)
        if j == len(text):
            return Parsed("")
        if text[j] != "[":
            return Parsed("", malformed=True)
        return calls_in_array(text, j, ("parameters",))


class NamedParser(ToolParser):
    """tool_choice naming a function: the grammar makes the whole answer its arguments object."""

    def __init__(self, function: str):
        self.function = function
        self.name = "named"

    def parse(self, text, final):
        done = False
        j = skip_ws(text, 0)
        if j < len(text) and text[j] == "{":
            try:
                done = value_end(text, j) is not None
            except Malformed:
                pass
        return Parsed("", [Call(self.function, text, done=done)])


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
