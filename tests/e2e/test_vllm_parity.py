"""vLLM API parity (issue 21): what a vLLM user sends works as in vLLM, or is refused with a 400 naming the field.

Through the official openai client where it exposes the field (extra_body for vLLM's), raw HTTP otherwise."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.support.hf_reference import hf_prompt_logprobs
from tests.support.server import KEY

AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT_IDS = [366, 82, 305, 280, 322, 17, 99, 41, 250, 8, 77, 123, 9, 11, 300, 12, 13]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60, **kw)


def completion(server, **body) -> dict:
    r = post(server, "/v1/completions", {"prompt": PROMPT_IDS, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------- item 2
def test_completions_default_to_16_tokens(client):
    r = client.completions.create(model="tiny", prompt="Hello world", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_chat_keeps_what_the_context_leaves(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
    r = post(server, "/v1/chat/completions", body).json()
    assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 256


# ---------------------------------------------------------------------- item 3
def test_logprobs_zero_returns_the_sampled_token(client):
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=4, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4
    assert lp.top_logprobs == [{tok: v} for tok, v in zip(lp.tokens, lp.token_logprobs)]


def test_logprobs_n_maps_the_token_and_its_top_n(client):
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=4, temperature=1.0, seed=3, logprobs=2)
    lp = r.choices[0].logprobs
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[tok] == v and 2 <= len(top) <= 3


# ---------------------------------------------------------------------- items 4 and 6
def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt(client, tiny_model):
    r = client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=0, echo=True, logprobs=1)
    choice, ref = r.choices[0], hf_prompt_logprobs(tiny_model, PROMPT_IDS)
    lp = choice.logprobs
    assert len(lp.tokens) == len(PROMPT_IDS)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref, abs=1e-4)
    assert "".join(lp.tokens) == choice.text  # the echoed prompt, nothing generated
    offsets = [0]
    for tok in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert lp.text_offset == offsets
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(PROMPT_IDS)


def test_echo_with_logprobs_puts_the_prompt_first(client):
    r = client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    choice = r.choices[0]
    lp = choice.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert choice.text.startswith("Hello world")
    assert lp.text_offset[n_prompt] == len("".join(lp.tokens[:n_prompt]))
    streamed = client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=3, echo=True, logprobs=0, temperature=0, stream=True
    )
    tokens, offsets, logprobs = [], [], []
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
            logprobs += chunk.choices[0].logprobs.token_logprobs
    assert (tokens, offsets, logprobs) == (lp.tokens, lp.text_offset, lp.token_logprobs)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_prompt_logprobs_match_hf(server, tiny_model, endpoint):
    if endpoint == "completions":
        r = completion(server, max_tokens=1, prompt_logprobs=2)
        prompt_logprobs, ids = r["choices"][0]["prompt_logprobs"], PROMPT_IDS
    else:
        body = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 1, "prompt_logprobs": 0}
        r = post(server, "/v1/chat/completions", {**body, "return_token_ids": True}).json()
        prompt_logprobs, ids = r["prompt_logprobs"], r["prompt_token_ids"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    ref = hf_prompt_logprobs(tiny_model, ids)
    for i, entry in enumerate(prompt_logprobs[1:]):
        own = entry[str(ids[i + 1])]
        assert own["logprob"] == pytest.approx(ref[i], abs=1e-4)
        assert own["rank"] >= 1 and isinstance(own["decoded_token"], str)
        tops = sorted((v for k, v in entry.items() if k != str(ids[i + 1]) or v["rank"] == 1), key=lambda v: v["rank"])
        assert len(entry) <= (3 if endpoint == "completions" else 1) + 0 or tops
    r2 = completion(server, max_tokens=1, prompt_logprobs=2)  # a prefix-cache hit must not cut them short
    if endpoint == "completions":
        assert r2["choices"][0]["prompt_logprobs"] == prompt_logprobs


# ---------------------------------------------------------------------- item 5
def test_min_tokens_holds_back_stop_tokens(server):
    first = completion(server, max_tokens=1, return_token_ids=True)["choices"][0]["token_ids"][0]
    stopped = completion(server, max_tokens=10, stop_token_ids=[first])["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == first
    held = completion(server, max_tokens=10, stop_token_ids=[first], min_tokens=4, return_token_ids=True)["choices"][0]
    assert len(held["token_ids"]) >= 4 and first not in held["token_ids"][:4]
    eos = completion(server, max_tokens=10, logit_bias={"2": 100}, min_tokens=3, return_token_ids=True)
    ids = eos["choices"][0]["token_ids"]
    assert len(ids) == 4 and 2 not in ids[:3] and ids[3] == 2  # EOS (id 2) waits for min_tokens, then ends it


def test_allowed_token_ids(client):
    r = client.completions.create(
        model="tiny",
        prompt="Hello world",
        max_tokens=12,
        temperature=1.0,
        seed=5,
        extra_body={"allowed_token_ids": [40, 41, 42], "return_token_ids": True},
    )
    assert set(r.choices[0].token_ids) <= {40, 41, 42}


def test_truncate_prompt_tokens_keeps_the_last_tokens(server):
    r = completion(server, max_tokens=1, truncate_prompt_tokens=5, return_token_ids=True)
    assert r["choices"][0]["prompt_token_ids"] == PROMPT_IDS[-5:]
    assert r["usage"]["prompt_tokens"] == 5
    too_long = post(server, "/v1/completions", {"prompt": PROMPT_IDS, "truncate_prompt_tokens": 1000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "truncate_prompt_tokens"


def test_return_token_ids(client, server):
    r = client.completions.create(
        model="tiny", prompt=PROMPT_IDS, max_tokens=3, temperature=0, extra_body={"return_token_ids": True}
    )
    assert r.choices[0].prompt_token_ids == PROMPT_IDS and len(r.choices[0].token_ids) == 3
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=3, temperature=0, extra_body={"return_token_ids": True}
    )
    ids = post(server, "/tokenize", {"messages": messages})
    assert chat.prompt_token_ids == ids.json()["tokens"] and len(chat.choices[0].token_ids) == 3


def test_return_tokens_as_token_ids(client):
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT_IDS,
        max_tokens=3,
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True},
    )
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in r.choices[0].token_ids]
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert all(c.token.startswith("token_id:") for c in chat.choices[0].logprobs.content)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_with_continue_final_message(client, stream):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    kw = dict(model="tiny", messages=messages, max_tokens=3, temperature=0, stream=stream)
    extra = {"echo": True, "continue_final_message": True, "add_generation_prompt": False}
    r = client.chat.completions.create(**kw, extra_body=extra)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else r.choices[0].message.content
    plain = client.chat.completions.create(**{**kw, "stream": False}, extra_body={**extra, "echo": False})
    assert text == "The answer is" + plain.choices[0].message.content
    # the last message is the user's: nothing to echo
    r = client.chat.completions.create(
        model="tiny", messages=messages[:1], max_tokens=3, temperature=0, extra_body={"echo": True}
    )
    assert not r.choices[0].message.content.startswith("hi")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_stats(client, endpoint):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    kw = dict(model="tiny", max_tokens=5, temperature=0, stream=True, stream_options=opts)
    if endpoint == "completions":
        chunks = list(client.completions.create(prompt="Hello", **kw, extra_body={"ignore_eos": True}))
    else:
        messages = [{"role": "user", "content": "hi"}]
        chunks = list(client.chat.completions.create(messages=messages, **kw, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chunks)
    completion_tokens = [c.usage.completion_tokens for c in chunks]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 5
    assert not chunks[-1].choices  # the final usage chunk, as before


def test_beam_search_is_refused_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "use_beam_search"
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"use_beam_search": False})
    assert ok.choices


# ---------------------------------------------------------------------- item 7
@pytest.mark.parametrize("field", ["stop_token_ids", "allowed_token_ids"])
def test_token_ids_outside_the_vocabulary_are_400(server, field):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: [5, 600]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == field and "600" in error["message"] and "512" in error["message"]


# ---------------------------------------------------------------------- item 8
def test_tokenize_returns_token_strs_null(server):
    r = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert "token_strs" in r and r["token_strs"] is None


# ---------------------------------------------------------------------- item 9
def test_wrong_content_type_is_415(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 1})
    form = httpx.post(
        server.url + "/v1/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415 and form.json()["error"]["code"] == 415
    for ctype in ("application/json; charset=utf-8", "Application/JSON", None):
        headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
        r = httpx.post(server.url + "/v1/completions", content=body.encode(), headers=headers)
        assert r.status_code == 200, (ctype, r.text)


def test_sampling_is_unchanged_without_the_new_fields(server, tiny_model):
    """Greedy output matches the offline engine's (the features cost nothing and change nothing unasked)."""
    from kubellm.runtime import LLM, SamplingParams

    r = completion(server, max_tokens=8, ignore_eos=True, return_token_ids=True)
    ref = LLM(tiny_model).generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert r["choices"][0]["token_ids"] == ref.outputs[0].token_ids
    assert torch.__version__  # torch is what the reference runs on


# ---------------------------------------------------------------------- every field has an effect
# A field of the request models is accepted only if it changes the answer, or is listed here with the reason it
# cannot (vLLM accepts and ignores unknown fields, so a field we declare but ignore would be a silent lie).
NO_OP_FIELDS = {
    "user": "OpenAI's end-user id, for the provider's abuse monitoring: changes no answer, in OpenAI's API either",
    "priority": "orders queued requests under --scheduling-policy priority; one request alone answers the same "
    "(the ordering is tested in tests/unit/test_engine_behaviour.py)",
    "chat_template_kwargs": "variables for the model's chat template: their effect is the template's (the tiny "
    "model's reads none); the template call's own arguments are refused (tests/e2e/test_errors.py)",
}
USER = {"role": "user", "content": "Hello world"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CONTINUE = {"messages": [USER, {"role": "assistant", "content": "Sure"}], "add_generation_prompt": False}
BASE = {
    "completions": {"prompt": "Hello world", "max_tokens": 8, "temperature": 1.0, "seed": 11},
    "chat": {"messages": [USER], "max_tokens": 8, "temperature": 1.0, "seed": 11},
}
# greedy over 20 favoured tokens: it repeats them, so a penalty on repeats must change which one comes next
REPEATING = {
    "temperature": 0,
    "max_tokens": 32,
    "ignore_eos": True,
    "logit_bias": {str(t): 10 for t in range(100, 120)},
    "return_token_ids": True,  # byte tokens: their text is all U+FFFD
}
# field → (what both requests also carry, the field's value: a value, or a function of the base answer's text)
PROBES = {
    "model": ({}, "another-model"),
    "n": ({}, 2),
    "temperature": ({}, 0.0),
    "top_p": ({}, 0.05),
    "top_k": ({}, 1),
    "min_p": ({}, 0.5),
    "seed": ({}, 12),
    "stop": ({}, lambda text: text[2:4]),
    "stream": ({}, True),
    "stream_options": ({"stream": True}, {"include_usage": True}),
    "stream_options.include_usage": ({"stream": True}, {"include_usage": True}),
    "stream_options.continuous_usage_stats": (
        {"stream": True, "stream_options": {"include_usage": True}},
        {"include_usage": True, "continuous_usage_stats": True},
    ),
    "presence_penalty": (REPEATING, 2.0),
    "frequency_penalty": (REPEATING, 2.0),
    "repetition_penalty": (REPEATING, 5.0),
    "logit_bias": ({}, {"100": 100}),
    "ignore_eos": ({"logit_bias": {"2": 100}}, True),
    "stop_token_ids": ({"logit_bias": {"100": 100}}, [100]),
    "skip_special_tokens": ({"logit_bias": {"1": 100}}, False),
    "response_format": ({}, {"type": "json_object"}),
    "guided_json": ({}, {"type": "object"}),
    "guided_regex": ({}, "[ab]+"),
    "guided_choice": ({}, ["yes", "no"]),
    "guided_grammar": ({}, 'start: "yes" | "no"'),
    "structured_outputs": ({}, {"choice": ["yes", "no"]}),
    "min_tokens": ({"logit_bias": {"2": 100}}, 3),
    "allowed_token_ids": ({}, [40, 41]),
    "truncate_prompt_tokens": ({}, 1),
    "prompt_logprobs": ({}, 0),
    "return_token_ids": ({}, True),
    "max_tokens": ({}, 2),
    # completions only
    "prompt": ({}, "Another prompt"),
    "echo": ({}, True),
    "suffix": ({}, "x"),  # refused (400)
    # chat only
    "messages": ({}, [{"role": "user", "content": "Another"}]),
    "max_completion_tokens": ({}, 2),
    "top_logprobs": ({"logprobs": True}, 2),
    "add_generation_prompt": ({}, False),
    "continue_final_message": (CONTINUE, True),
    "tools": ({}, [TOOL]),  # "auto" without --enable-auto-tool-choice: a 400, as vLLM
    "tool_choice": ({"tools": [TOOL], "tool_choice": "none"}, "required"),
    "parallel_tool_calls": ({"tools": [TOOL], "tool_choice": "required", "max_tokens": 200}, False),
}
ENDPOINT_PROBES = {
    ("completions", "logprobs"): ({}, 0),
    ("chat", "logprobs"): ({}, True),
    ("completions", "return_tokens_as_token_ids"): ({"logprobs": 0}, True),
    ("chat", "return_tokens_as_token_ids"): ({"logprobs": True}, True),
    ("chat", "echo"): ({**CONTINUE, "continue_final_message": True}, True),
}


def _fields(model) -> list[str]:
    from kubellm.runtime.server import protocol as p

    names = []
    for name in model.model_fields:
        names.append(name)
        if name == "stream_options":
            names += [f"stream_options.{sub}" for sub in p.StreamOptions.model_fields]
    return names


def _answer(server, endpoint: str, body: dict):
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    r = post(server, path, body)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        for e in events:
            e.pop("id", None), e.pop("created", None)
        return r.status_code, events
    data = r.json()
    if isinstance(data, dict):
        data.pop("id", None), data.pop("created", None)
    return r.status_code, data


def _text(answer) -> str:
    choice = answer[1]["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_request_field_changes_the_answer_or_is_a_documented_no_op(server, endpoint):
    from kubellm.runtime.server import protocol as p

    model = p.CompletionRequest if endpoint == "completions" else p.ChatCompletionRequest
    unprobed, no_effect = [], []
    for name in _fields(model):
        if name in NO_OP_FIELDS:
            continue
        probe = ENDPOINT_PROBES.get((endpoint, name)) or PROBES.get(name)
        if probe is None:
            unprobed.append(name)
            continue
        extra, value = probe
        base = {**BASE[endpoint], **extra}
        base_answer = _answer(server, endpoint, base)
        assert base_answer[0] == 200, (name, base_answer)
        if callable(value):
            value = value(_text(base_answer))
        top, _, sub = name.partition(".")
        probed = {**base, top: value}
        if _answer(server, endpoint, probed) == base_answer:
            no_effect.append(name)
    assert not unprobed, f"fields with no probe: add one to PROBES, or to NO_OP_FIELDS with its reason: {unprobed}"
    assert not no_effect, f"fields accepted without any effect on the answer: {no_effect}"
