"""LoRA adapters through a real `kubellm serve` and the official openai client: adapters loaded at start and at
run time (/v1/load_lora_adapter, /v1/unload_lora_adapter behind --allow-runtime-lora-updating; with
--admin-key-file only that key may call them), requests that
pick one by `model` — concurrent ones of the base model and two adapters share the engine's batches — each
answered as HF + PEFT answers; /v1/models lists adapters with their parent; the limits are 400s naming the
field; vllm:lora_requests_info."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.support.api import assert_error, post
from tests.support.lora import make_adapter, peft_greedy
from tests.support.server import ServerProcess
from tests.support.tiny_models import random_prompts
from tests.support.wait import wait_until

NEW = 12


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora-e2e")
    return {
        "all8": make_adapter(tiny_model, str(root / "all8"), rank=8, seed=11),
        "qvd4": make_adapter(
            tiny_model, str(root / "qvd4"), rank=4, targets=("q_proj", "v_proj", "down_proj"), seed=12
        ),
        "rank16": make_adapter(tiny_model, str(root / "rank16"), rank=16, seed=13),
    }


@pytest.fixture(scope="module")
def lora_server(tiny_model, adapters):
    s = ServerProcess(
        tiny_model,
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "256",
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "8",
        "--lora-modules",
        f"all8={adapters['all8']}",
        "--allow-runtime-lora-updating",
    )
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _complete(client: openai.OpenAI, model: str, prompt: list[int]) -> list[int]:
    r = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=NEW,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return r.choices[0].model_extra["token_ids"]


def _admin(client: openai.OpenAI, path: str, body: dict) -> httpx.Response:
    return client.post(path, body=body, cast_to=httpx.Response)


def test_models_list_adapters_with_their_parent(lora_server, adapters):
    models = {m.id: m for m in _client(lora_server).models.list()}
    assert set(models) == {"tiny", "all8"}
    assert models["all8"].model_extra["parent"] == "tiny" and models["all8"].model_extra["root"] == adapters["all8"]
    assert models["tiny"].model_extra.get("parent") is None


def test_concurrent_requests_of_base_and_adapters_match_peft(lora_server, tiny_model, adapters):
    client = _client(lora_server)
    _admin(client, "/load_lora_adapter", {"lora_name": "qvd4", "lora_path": adapters["qvd4"]})
    try:
        prompts = random_prompts(seed=31, lengths=[5, 30, 12, 44, 7, 21])
        models = ["tiny", "all8", "qvd4"] * 2
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda mp: _complete(client, *mp), zip(models, prompts)))
        paths = {"tiny": None, "all8": adapters["all8"], "qvd4": adapters["qvd4"]}
        base = peft_greedy(tiny_model, None, prompts, NEW)
        for i, (model, prompt) in enumerate(zip(models, prompts)):
            expected = peft_greedy(tiny_model, paths[model], [prompt], NEW)[0]
            assert got[i] == expected, f"{model} prompt {i}"
            if model != "tiny":
                assert expected != base[i], f"{model} changed nothing on prompt {i}"
        metrics = httpx.get(lora_server.url + "/metrics").text
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    finally:
        _admin(client, "/unload_lora_adapter", {"lora_name": "qvd4"})


def test_load_use_unload_and_the_limits(lora_server, tiny_model, adapters):
    client = _client(lora_server)
    with pytest.raises(openai.BadRequestError) as e:  # rank 16 > --max-lora-rank 8
        _admin(client, "/load_lora_adapter", {"lora_name": "big", "lora_path": adapters["rank16"]})
    assert e.value.body["param"] == "max_lora_rank"
    r = _admin(client, "/load_lora_adapter", {"lora_name": "late", "lora_path": adapters["qvd4"]})
    assert r.status_code == 200 and "late" in r.text
    with pytest.raises(openai.BadRequestError) as e:  # two loaded: all8 and late
        _admin(client, "/load_lora_adapter", {"lora_name": "third", "lora_path": adapters["qvd4"]})
    assert e.value.body["param"] == "max_loras"
    with pytest.raises(openai.BadRequestError) as e:
        _admin(client, "/load_lora_adapter", {"lora_name": "late", "lora_path": adapters["qvd4"]})
    assert e.value.body["param"] == "lora_name"
    prompt = random_prompts(seed=32, lengths=[19])[0]
    assert _complete(client, "late", prompt) == peft_greedy(tiny_model, adapters["qvd4"], [prompt], NEW)[0]
    chat = client.chat.completions.create(model="late", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.model == "late"  # vLLM names the adapter
    stream = client.chat.completions.create(
        model="late", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert {chunk.model for chunk in stream} == {"late"}
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert base.model == "tiny"
    assert "late" in {m.id for m in client.models.list()}
    _admin(client, "/unload_lora_adapter", {"lora_name": "late"})
    assert "late" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        _complete(client, "late", prompt)
    with pytest.raises(openai.NotFoundError):
        _admin(client, "/unload_lora_adapter", {"lora_name": "late"})


def test_runtime_updates_are_off_without_the_flag(server):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 404


def test_with_an_admin_key_only_it_loads_and_unloads_adapters(tiny_model, adapters, tmp_path):
    """--admin-key-file (what the operator runs pods with): client API keys serve but cannot touch adapters (403),
    no key is a 401; the admin key loads and unloads, lists models, is never rate limited, and a rotated file
    takes effect without a restart."""
    (tmp_path / "keys").write_text("client-key\n")
    admin = tmp_path / "admin"
    admin.write_text("admin-1\n")
    s = ServerProcess(
        tiny_model,
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "256",
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "8",
        "--allow-runtime-lora-updating",
        "--api-key-file",
        str(tmp_path / "keys"),
        "--admin-key-file",
        str(admin),
        "--rate-limit-rpm",
        "1",
        "--rate-limit-burst",
        "1",
    ).wait_ready()
    try:
        load = {"lora_name": "qvd4", "lora_path": adapters["qvd4"]}

        def call(path: str, key: str | None, body: dict = load) -> httpx.Response:
            return post(s, f"/v1/{path}", body, headers={"Authorization": f"Bearer {key}"} if key else {})

        assert_error(call("load_lora_adapter", None), 401)
        assert_error(call("load_lora_adapter", "client-key"), 403, contains="admin key")
        assert_error(call("unload_lora_adapter", "client-key", {"lora_name": "qvd4"}), 403)
        # rpm 1, burst 1: a client's second admitted call is a 429; the admin's never are (three in a row here)
        assert call("load_lora_adapter", "admin-1").status_code == 200
        assert_error(call("load_lora_adapter", "admin-1"), 400, param="lora_name")  # in use: refused, not limited
        models = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer admin-1"}, timeout=30).json()
        assert {m["id"]: m.get("parent") for m in models["data"]} == {"tiny": None, "qvd4": "tiny"}

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="client-key", max_retries=0)
        want = peft_greedy(tiny_model, adapters["qvd4"], [[5, 6, 7]], NEW)[0]
        assert _complete(client, "qvd4", [5, 6, 7]) == want
        with pytest.raises(openai.RateLimitError):
            _complete(client, "tiny", [5, 6, 7])

        admin.write_text("admin-2\n")  # the operator's Secret replaced: the mounted file changes in place
        wait_until(
            lambda: call("unload_lora_adapter", "admin-2", {"lora_name": "qvd4"}).status_code == 200,
            timeout=30,
            what="the rotated admin key to be read",
        )
        assert_error(call("load_lora_adapter", "admin-1"), 401)
    finally:
        s.stop()
