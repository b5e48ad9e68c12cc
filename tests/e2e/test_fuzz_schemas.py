"""Fuzz every endpoint with bodies derived from its request schema (the pydantic models' JSON schema, through
hypothesis-jsonschema), then abused: every numeric field of every request model set to extremes, values nested
deeper than any parser likes, lone surrogates and odd encodings. No body ever gets a 5xx; every refusal is an
OpenAI-shaped error."""

from __future__ import annotations

import json

import httpx
import hypothesis_jsonschema._from_schema as jsonschema_internals
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as conjecture_utils

from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.protocol_responses import ResponsesRequest
from tests.support.api import AUTH


class _Many:
    """hypothesis-jsonschema 0.23 (its latest) drives Hypothesis' private `many` with more()/reject(); since
    Hypothesis 6.16x it is iterated inside a with-block. The same decisions, in the old spelling."""

    def __init__(self, data, *, min_size, max_size, average_size):
        self._many = conjecture_utils.many(data, min_size=min_size, max_size=max_size, average_size=average_size)
        self._many.__enter__()
        self._it = iter(self._many)

    def more(self) -> bool:
        try:
            next(self._it)
            return True
        except StopIteration:
            self._many.__exit__(None, None, None)
            return False

    def reject(self, why=None) -> None:
        self._many.reject()


if not hasattr(conjecture_utils.many, "more"):
    jsonschema_internals.cu = type("cu", (), {"many": _Many})

from hypothesis_jsonschema import from_schema  # noqa: E402

ENDPOINTS = {
    "/v1/completions": p.CompletionRequest,
    "/v1/chat/completions": p.ChatCompletionRequest,
    "/tokenize": p.TokenizeRequest,
    "/detokenize": p.DetokenizeRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/chat/completions/render": p.ChatCompletionRequest,
    "/v1/completions/render": p.CompletionRequest,
}


def numeric_fields(schema: dict) -> list[tuple[str, str]]:
    """(field, shape) for every top-level field whose schema admits a number: as itself ("scalar"), in a list
    ("list": stop_token_ids, tokens, a prompt of ids), in a list of lists ("list2": prompts of ids) or as a
    mapping's values ("map": logit_bias), directly or in anyOf."""
    defs = schema.get("$defs", {})

    def shapes(s: dict, seen=()) -> set[str]:
        if "$ref" in s:
            name = s["$ref"].rsplit("/", 1)[-1]
            return set() if name in seen else shapes(defs[name], (*seen, name))
        out = set()
        kinds = {s["type"]} if isinstance(s.get("type"), str) else set(s.get("type") or [])
        if kinds & {"integer", "number"}:
            out.add("scalar")
        if "array" in kinds and isinstance(s.get("items"), dict):
            inner = shapes(s["items"], seen)
            out |= {"list"} if "scalar" in inner else set()
            out |= {"list2"} if "list" in inner else set()
        if "object" in kinds and isinstance(s.get("additionalProperties"), dict):
            out |= {"map"} if "scalar" in shapes(s["additionalProperties"], seen) else set()
        for alt in s.get("anyOf", []) + s.get("oneOf", []):
            out |= shapes(alt, seen)
        return out

    return [(name, shape) for name, s in schema.get("properties", {}).items() for shape in sorted(shapes(s))]


def shaped(shape: str, number: str) -> str:
    """A number (JSON text) in the field's shape."""
    return {"scalar": "{}", "list": "[{}]", "list2": "[[{}]]", "map": '{{"5": {}}}'}[shape].format(number)


EXTREMES = [2**63, 2**63 - 1, -(2**63) - 1, 2**64, 10**30, -(10**30), 2**31, -1, 0, 1e308, -1e308, 5e-324, 1.5]
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-0", "1" + "0" * 5000]  # JSON Python reads anyway


def deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def abused(draw, path: str) -> bytes:
    """A body of `path`'s schema, then (most of the time) one abuse: a numeric extreme on a numeric field, a
    deep nesting, a lone surrogate or an odd encoding."""
    model = ENDPOINTS[path]
    schema = model.model_json_schema()
    body = draw(from_schema(schema))
    if "max_tokens" not in body and "max_completion_tokens" not in body and path.startswith("/v1/"):
        body["max_tokens"] = 4  # keep valid runs short: not the whole context
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)
    if path == "/v1/responses" and not isinstance(body.get("max_output_tokens"), int):
        body["max_output_tokens"] = 4
    if isinstance(body.get("max_output_tokens"), int):
        body["max_output_tokens"] = min(body["max_output_tokens"], 8)
    if isinstance(body.get("max_completion_tokens"), int):
        body["max_completion_tokens"] = min(body["max_completion_tokens"], 8)
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 3)
    fields = numeric_fields(schema)
    abuse = draw(st.sampled_from(["none", "extreme", "extreme", "raw_number", "nesting", "surrogate", "encoding"]))
    text = json.dumps(body)
    if abuse in ("extreme", "raw_number") and fields:
        field, shape = draw(st.sampled_from(fields))
        number = draw(st.sampled_from([json.dumps(v) for v in EXTREMES] if abuse == "extreme" else RAW_NUMBERS))
        body[field] = "__NUMBER__"
        text = json.dumps(body).replace('"__NUMBER__"', shaped(shape, number))
    elif abuse == "nesting":
        field = draw(st.sampled_from([*body, "prompt", "messages", "chat_template_kwargs", "logit_bias", "x"]))
        body[field] = "__DEEP__"
        nested = deep(draw(st.sampled_from([64, 999, 1001, 3000, 20_000])), draw(st.sampled_from(["list", "dict"])))
        text = json.dumps(body).replace('"__DEEP__"', nested)
    elif abuse == "surrogate":
        field = draw(st.sampled_from(["model", "prompt", "messages", "stop", "user", "x"]))
        lone = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "a\\udc00b", "\\ud800\\ud800"]))
        value = f'"{lone}"'
        if field == "messages":
            value = f'[{{"role": "user", "content": "{lone}"}}]'
        body[field] = "__S__"
        text = json.dumps(body).replace('"__S__"', value)
    elif abuse == "encoding":
        raw = text.encode()
        return draw(
            st.sampled_from(
                [
                    b"\xef\xbb\xbf" + raw,  # a BOM
                    raw.replace(b"}", b"\xff}", 1),  # invalid UTF-8
                    text.encode("utf-16"),
                    raw.replace(b'"', b'"\\u0000', 1),
                    raw + b"\x00",
                ]
            )
        )
    return text.encode()


@pytest.mark.timeout(1800)  # 25 bodies, some generating, on a shared 2-core VM
@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_schema_fuzz_never_gets_a_5xx(server, path):
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw=abused(path))
    def check(raw: bytes):
        r = httpx.post(server.url + path, content=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code < 500, (raw[:500], r.text[:500])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_every_numeric_field_at_every_extreme_is_never_a_5xx(server, path):
    """Not left to chance: each numeric field of each request model, at each extreme, on a valid body."""
    model = ENDPOINTS[path]
    base = {
        "/v1/completions": {"prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/tokenize": {"prompt": "hi"},
        "/detokenize": {"tokens": [1, 2]},
        "/v1/responses": {"input": "hi", "max_output_tokens": 2},
        "/v1/chat/completions/render": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/v1/completions/render": {"prompt": "hi", "max_tokens": 2},
    }[path]
    fields = numeric_fields(model.model_json_schema())
    assert fields or path == "/tokenize", path
    for field, shape in fields:
        for value in [*(json.dumps(v) for v in EXTREMES), *RAW_NUMBERS]:
            raw = json.dumps({**base, field: "__V__"}).replace('"__V__"', shaped(shape, value))
            r = httpx.post(server.url + path, content=raw, headers=AUTH, timeout=60)
            assert r.status_code < 500, (field, shape, value, r.text[:500])
