"""A real `kubellm serve` over a socket, driven by the official openai client (sync, async, streaming)."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from kubellm.downloads import LOADING_WEIGHTS, WARMING_UP, last_startup_phase
from kubellm.runtime import LLM, SamplingParams
from tests.support.server import KEY


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_matches_the_offline_engine(client, tiny_model):
    out = client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    ref = LLM(tiny_model).generate("Hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.choices[0].text == ref.outputs[0].text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_uses_the_chat_template(client, tiny_model):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    ref = LLM(tiny_model).generate([ids], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ids)


def test_streaming_chat_adds_up_to_the_non_streaming_answer(client):
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_streaming_completion_ends_with_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": "Once", "max_tokens": 5, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_async_client_many_concurrent_requests(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        calls = [
            aclient.completions.create(
                model="tiny", prompt=f"Request {i}", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            for i in range(24)
        ]
        return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    assert all(o.usage.completion_tokens == 8 for o in outs)


def test_n_seed_stop_and_logprobs(client):
    out = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=8,
        n=3,
        seed=7,
        temperature=1.0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 24
    again = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=8, n=3, seed=7, temperature=1.0, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    lp = out.choices[0].logprobs
    # the sampled token and the top 2 (as vLLM and OpenAI: 2 entries when it is one of them)
    assert len(lp.tokens) == 8 and all(2 <= len(t) <= 3 for t in lp.top_logprobs)
    full = (
        client.completions.create(
            model="tiny", prompt="Hello", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[5:8]
    cut = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_logit_bias_matches_the_offline_engine(client, tiny_model):
    bias = {5: 100.0, 6: -100.0}
    out = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True},
    )
    ref = (
        LLM(tiny_model)
        .generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias=bias))[0]
        .outputs[0]
    )
    assert ref.token_ids == [5] * 6
    assert out.choices[0].text == ref.text


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy picks the top one


def test_fields_that_ask_for_nothing_are_accepted(client):
    """SDKs and gateways send defaults of features we lack (plain-text response format, no tools): fine."""
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="auto",
        tools=[],
        extra_body={"best_of": 1, "ignore_eos": True},
    )
    assert out.usage.completion_tokens == 2


def test_request_id_is_echoed(server):
    r = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "abc-123"},
        json={"prompt": "Hi", "max_tokens": 2},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "cmpl-abc-123"
    assert '"request_id": "abc-123"' in server.logs()


def test_the_log_names_the_startup_phases_in_order_before_ready(server):
    """What the operator reads from a starting pod's log (it cannot ask: nothing listens before ready)."""
    lines = server.logs().splitlines()
    phases = [(i, p) for i, line in enumerate(lines) if (p := last_startup_phase(line))]
    ready = next(i for i, line in enumerate(lines) if '"event": "ready"' in line)
    assert [p for _, p in phases] == [LOADING_WEIGHTS, WARMING_UP]
    assert phases[0][0] < phases[1][0] < ready


def test_echo_prepends_the_prompt(client):
    plain = (
        client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    echoed = (
        client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=4, temperature=0, echo=True, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    assert echoed == "Hello there" + plain


def test_max_tokens_null_is_what_the_context_leaves(server):
    # completions default to 16 (OpenAI's and vLLM's: tests/e2e/test_vllm_parity.py); an explicit null, as in vLLM,
    # generates to the end of the context
    r = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": [5] * 200, "ignore_eos": True, "max_tokens": None},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 256 - 200  # the server runs with --max-model-len 256
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_server_side_detokenization_matches_the_engine(client, tiny_model):
    """The server process decodes streamed tokens itself (the engine only for stop strings): its text, streamed
    or not, equals the offline engine's for the same seeded samples, partial UTF-8 bytes included."""
    kwargs = dict(
        model="tiny", prompt="Once upon", max_tokens=60, n=2, seed=3, temperature=1.0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kwargs)
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    ref = LLM(tiny_model).generate(
        "Once upon", SamplingParams(n=2, seed=3, temperature=1.0, max_tokens=60, ignore_eos=True)
    )[0]
    expected = [o.text for o in ref.outputs]
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == expected
    assert [streamed[0], streamed[1]] == expected
    assert any("\ufffd" in t or len(t) > 20 for t in expected)  # a real decode, not two empty strings


def test_chat_template_flag_replaces_the_models_template(tiny_model, tmp_path):
    """`--chat-template FILE` (vLLM's flag): chat prompts are rendered with it instead of the tokenizer's."""
    from transformers import AutoTokenizer

    from tests.support.server import ServerProcess

    path = tmp_path / "template.jinja"
    path.write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    s = ServerProcess(tiny_model, "--chat-template", str(path), "--served-model-name", "tiny").wait_ready()
    try:
        body = {
            "model": "tiny",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        }
        out = httpx.post(s.url + "/v1/chat/completions", json=body).json()
    finally:
        s.stop()
    ids = AutoTokenizer.from_pretrained(tiny_model).encode(
        "<system>Be brief.\n<user>Tell me a story.\n<assistant>", add_special_tokens=False
    )
    ref = LLM(tiny_model).generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["choices"][0]["message"]["content"] == ref.outputs[0].text


def test_tokenize_and_detokenize_agree_with_the_tokenizer_and_the_engine(client, server, tiny_model):
    """vLLM's /tokenize and /detokenize: a prompt's ids are what the completion endpoint counts, chat messages
    are rendered with the chat template as the chat endpoint does, and /detokenize inverts /tokenize."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    auth = {"Authorization": f"Bearer {KEY}"}

    def call(path, body):
        r = httpx.post(server.url + path, headers=auth, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    text = "Hello world, tokenize me"
    got = call("/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True})
    assert got["tokens"] == tok.encode(text, add_special_tokens=True)
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 256
    assert got["token_strs"] == tok.convert_ids_to_tokens(got["tokens"])
    completion = client.completions.create(model="tiny", prompt=text, max_tokens=1)
    assert completion.usage.prompt_tokens == got["count"]
    assert call("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"] == tok.encode(
        text, add_special_tokens=False
    )

    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = call("/tokenize", {"messages": messages})
    assert chat["token_strs"] is None  # vLLM sends it, null, when not asked for (clients index it)
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens
    assert chat["tokens"] == tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )

    # vLLM's continue_final_message: the answer goes on from the last assistant message, no new turn
    story = messages + [{"role": "assistant", "content": "Once upon a"}]
    body = {"messages": story, "add_generation_prompt": False, "continue_final_message": True}
    continued = call("/tokenize", body)
    assert continued["tokens"] == tok.encode(
        tok.apply_chat_template(story, tokenize=False, continue_final_message=True), add_special_tokens=False
    )
    assert tok.decode(continued["tokens"]).endswith("Once upon a")
    answer = call("/v1/chat/completions", {**body, "max_tokens": 1})
    assert answer["usage"]["prompt_tokens"] == continued["count"]

    assert call("/detokenize", {"model": "tiny", "tokens": got["tokens"]})["prompt"] == tok.decode(got["tokens"])
    assert call("/detokenize", {"tokens": []})["prompt"] == ""


def test_structured_output_through_the_openai_client(client):
    """response_format json_schema (OpenAI's) and vLLM's guided_choice / guided_regex, streamed or not: the
    answer matches; JSON mode gives an object."""
    import json

    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "rank"],
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
    }
    messages = [{"role": "user", "content": "Name a city."}]
    out = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=60,
        n=2,
        temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    for choice in out.choices:
        answer = json.loads(choice.message.content)
        assert answer["city"] in ("Paris", "Rome") and 1 <= answer["rank"] <= 9
        assert choice.finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, stream=True, extra_body={"guided_choice": ["north", "south"]}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("north", "south")
    done = client.completions.create(
        model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{2}"}
    )  # \d: any script's digits
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", done.choices[0].text), done.choices[0].text
    newer = client.completions.create(
        model="tiny",
        prompt="Pick:",
        max_tokens=20,  # vLLM ≥ 0.10's spelling
        extra_body={"structured_outputs": {"choice": ["up", "down"]}},
    )
    assert newer.choices[0].text in ("up", "down")
    any_json = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, response_format={"type": "json_object"}
    )
    text = any_json.choices[0].message.content
    assert text.startswith("{")
    if any_json.choices[0].finish_reason == "stop":  # a random model may also run out of tokens first
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_n_sends_one_finish_chunk_per_choice(client, endpoint):
    """With n > 1 the choices finish at different steps (stop "e", seed 42); each gets exactly one chunk with a
    finish_reason, not one more on every later step of the others (issue 21, item 1)."""
    args = dict(model="tiny", n=3, max_tokens=20, temperature=1.0, seed=42, stop=["e"], stream=True)
    if endpoint == "completions":
        chunks = list(client.completions.create(prompt="Once upon a time", **args))
    else:
        chunks = list(
            client.chat.completions.create(messages=[{"role": "user", "content": "Once upon a time"}], **args)
        )
    choices = [c.choices[0] for c in chunks if c.choices]
    finished = [k for k, c in enumerate(choices) if c.finish_reason is not None]
    assert sorted(choices[k].index for k in finished) == [0, 1, 2]
    # a choice finished while another was still streaming: the case where the final chunk used to repeat
    assert any(c.finish_reason is None for c in choices[finished[0] + 1 :])
