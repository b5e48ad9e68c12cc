"""LoRA adapters between the operator, real `kubellm serve` pods and `kubellm router`:
- the operator's per-pod sync (kubellm/operator/adapters.py) against a real server: loads what is wanted, unloads
  what is not, does nothing when the pod already matches, and keeps a refused load's 4xx message while the base
  model keeps serving; behind API keys it calls with the pod's admin key, and a refused key is no adapter's fault;
- the router sends a request naming an adapter only to the pods that hold it (read from their /v1/models), lists
  adapters with their parent, and answers 404 for an unknown name and for an adapter no pod holds any more; a
  request for an adapter the InferenceService declares but no pod holds yet waits for one (bounded);
- an s3:// or hf:// adapter, fetched by the rendered init container's command from a real local server (moto,
  the hub stand-in), loads and answers as the same adapter from a local directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import subprocess
import sys
import threading
import time

import aiohttp
import httpx
import openai
import pytest

from kubellm.operator.adapters import PodAdapters, plan, sync_pod
from kubellm.operator.render import adapter_paths, render
from kubellm.operator.spec import parse_spec
from tests.support.api import greedy_token_ids
from tests.support.hub import local_hub
from tests.support.lora import make_adapter
from tests.support.router import RouterProcess
from tests.support.s3 import downloader_env, moto_s3, upload_tree
from tests.support.server import ServerProcess
from tests.support.wait import wait_until


def isvc_object(spec: dict) -> dict:
    return {"metadata": {"name": "chat", "namespace": "ns", "uid": "u"}, "spec": spec}


LORA_ARGS = ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--allow-runtime-lora-updating")


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora-routing")
    return {
        "a1": make_adapter(tiny_model, str(root / "a1"), rank=8, seed=21),
        "a2": make_adapter(tiny_model, str(root / "a2"), rank=4, seed=22),
        "wide": make_adapter(tiny_model, str(root / "wide"), rank=16, seed=23),  # above --max-lora-rank 8
    }


@pytest.fixture(scope="module")
def pods(tiny_model):
    servers = [
        ServerProcess(tiny_model, "--served-model-name", "tiny", "--max-model-len", "256", *LORA_ARGS) for _ in range(2)
    ]
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for s in servers:
            s.stop()


def sync(url: str, desired: dict[str, str], before: PodAdapters | None = None, key: str | None = None) -> PodAdapters:
    async def run():
        async with aiohttp.ClientSession() as session:
            return await sync_pod(session, url, desired, key, before)

    return asyncio.run(run())


def models(url: str) -> dict[str, str | None]:
    return {m["id"]: m.get("parent") for m in httpx.get(url + "/v1/models").json()["data"]}


def complete(base_url: str, model: str) -> list[int]:
    return greedy_token_ids(openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0), model)


def test_the_operators_sync_loads_unloads_and_keeps_refusals(pods, adapters):
    url = pods[0].url
    want = {"a1": adapters["a1"], "a2": adapters["a2"]}
    got = sync(url, want)
    assert got.loaded == want and not got.failures and got.unreachable is None
    assert models(url) == {"tiny": None, "a1": "tiny", "a2": "tiny"}
    assert plan(want, sync(url, want, got).loaded, {}, 0.0) == []  # a second round: the pod already matches

    got = sync(url, {"a1": adapters["a1"]}, got)
    assert got.loaded == {"a1": adapters["a1"]} and models(url) == {"tiny": None, "a1": "tiny"}

    got = sync(url, {"a1": adapters["a1"], "wide": adapters["wide"]}, got)
    assert got.loaded == {"a1": adapters["a1"]}
    assert got.failures["wide"].message.startswith("400: ") and "max_lora_rank" in got.failures["wide"].message
    assert got.failures["wide"].path == adapters["wide"]
    again = sync(url, {"a1": adapters["a1"], "wide": adapters["wide"]}, got)  # not retried at once
    assert again.failures["wide"] == got.failures["wide"]
    base, adapted = complete(url, "tiny"), complete(url, "a1")
    assert len(base) == 8 and base != adapted  # the base model serves on; the adapter changes the output

    assert sync(url, {}, again).loaded == {} and models(url) == {"tiny": None}


def test_a_pod_that_cannot_be_reached_is_reported_not_raised():
    got = sync("http://127.0.0.1:9", {"a1": "/nowhere"}, PodAdapters({"a1": "/nowhere"}))
    assert got.unreachable and got.unreachable.startswith("GET /v1/models") and got.loaded == {"a1": "/nowhere"}


def test_the_operators_sync_with_the_pods_admin_key_behind_api_keys(tiny_model, adapters, tmp_path):
    """A pod as the operator runs it with spec.adapters and server.apiKeySecret: client keys and the admin key.
    The sync with the admin key lists, loads and unloads; with a stale key the pod is `denied` (the handler then
    reads the key afresh), and no adapter is marked as refused."""
    (tmp_path / "keys").write_text("client\n")
    (tmp_path / "admin").write_text("operator-key\n")
    keys = ("--api-key-file", str(tmp_path / "keys"), "--admin-key-file", str(tmp_path / "admin"))
    s = ServerProcess(tiny_model, "--served-model-name", "tiny", "--max-model-len", "256", *LORA_ARGS, *keys)
    s.wait_ready()
    try:
        want = {"a1": adapters["a1"]}
        got = sync(s.url, want, key="operator-key")
        assert got.loaded == want and not got.failures and got.unreachable is None and not got.denied
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="client", max_retries=0)
        assert {m.id for m in client.models.list()} == {"tiny", "a1"}
        assert greedy_token_ids(client, "a1") != greedy_token_ids(client, "tiny")

        stale = sync(s.url, {}, got, key="old-key")
        assert stale.denied and "401" in stale.unreachable and stale.loaded == want and not stale.failures
        as_client = sync(s.url, {}, got, key="client")  # a client key lists models, but may not unload
        assert as_client.denied and "403" in as_client.unreachable and not as_client.failures
        assert sync(s.url, {}, got, key="operator-key").loaded == {}
    finally:
        s.stop()


def admin(url: str, op: str, body: dict) -> None:
    r = httpx.post(f"{url}/v1/{op}_lora_adapter", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_the_router_sends_an_adapter_only_to_the_pods_that_hold_it(pods, adapters, tmp_path):
    a, b = pods
    admin(a.url, "load", {"lora_name": "a1", "lora_path": adapters["a1"]})
    admin(b.url, "load", {"lora_name": "a2", "lora_path": adapters["a2"]})
    r = RouterProcess(str(tmp_path / "routes.json"), {"tiny": [a.url, b.url]})
    try:
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        wait_until(
            lambda: (
                {m.id: m.model_extra.get("parent") for m in client.models.list()}
                == {"tiny": None, "a1": "tiny", "a2": "tiny"}
            ),
            timeout=30,
            what="the router to list both adapters",
        )
        direct = {"a1": complete(a.url, "a1"), "a2": complete(b.url, "a2"), "tiny": complete(a.url, "tiny")}
        assert len({tuple(v) for v in direct.values()}) == 3  # each adapter changes the base's output
        for _ in range(4):
            for name in ("a1", "a2"):
                assert complete(r.url, name) == direct[name]
        pods_of = {}
        for entry in r.request_logs():
            pods_of.setdefault(entry["model"], set()).add(entry["pod"])
        assert pods_of["a1"] == {a.url} and pods_of["a2"] == {b.url}
        with pytest.raises(openai.NotFoundError):
            complete(r.url, "a3")

        admin(a.url, "unload", {"lora_name": "a1"})
        wait_until(lambda: "a1" not in {m.id for m in client.models.list()}, timeout=30, what="a1 gone from the router")
        with pytest.raises(openai.NotFoundError):
            complete(r.url, "a1")
        assert complete(r.url, "a2") == direct["a2"]
    finally:
        r.stop()
        admin(b.url, "unload", {"lora_name": "a2"})


def test_a_declared_adapter_is_held_until_a_pod_holds_it_and_503_past_the_wait(pods, adapters, tmp_path):
    a, b = pods
    routes = {"tiny": {"endpoints": [a.url, b.url], "adapters": ["late", "never"]}}
    r = RouterProcess(str(tmp_path / "routes.json"), routes, "--adapter-wait-s", "15")
    loader = threading.Timer(3.0, admin, (b.url, "load", {"lora_name": "late", "lora_path": adapters["a2"]}))
    try:
        loader.start()  # the operator's load, a few seconds after the pod became Ready
        assert complete(r.url, "late") == complete(b.url, "late")
        assert {x["pod"] for x in r.request_logs() if x["model"] == "late"} == {b.url}
        started = time.monotonic()
        never = httpx.post(
            r.url + "/v1/completions", json={"model": "never", "prompt": "hi", "max_tokens": 1}, timeout=60
        )
        assert never.status_code == 503 and never.headers["Retry-After"] == "1", never.text
        assert "not loaded on a Ready pod" in never.json()["error"]["message"]
        assert time.monotonic() - started >= 15  # it waited for the adapter before answering
        with pytest.raises(openai.NotFoundError):  # not declared, not held
            complete(r.url, "other")
    finally:
        loader.join()
        r.stop()
        admin(b.url, "unload", {"lora_name": "late"})


@contextlib.contextmanager
def adapter_source(scheme: str, adapter_dir: str, tmp_path: pathlib.Path):
    """(uri, the downloader's environment) of the adapter served by a real local S3 server (moto) or hub stand-in."""
    if scheme == "s3":
        with moto_s3(log_path=tmp_path / "moto.log") as endpoint:
            upload_tree(endpoint, "loras", "team/a2", pathlib.Path(adapter_dir))
            yield "s3://loras/team/a2", downloader_env(endpoint)
    else:
        with local_hub("team/a2", pathlib.Path(adapter_dir)) as url:
            yield "hf://team/a2", {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf")}


@pytest.mark.parametrize("scheme", ["s3", "hf"])
def test_a_downloaded_adapter_fetched_as_its_init_container_would_loads_and_answers_equal(
    pods, adapters, tmp_path, scheme
):
    """The rendered init container's own command and environment against a real local server, then the operator's
    sync: the downloaded adapter answers exactly as the same adapter loaded from its local directory."""
    url = pods[0].url
    with adapter_source(scheme, adapters["a2"], tmp_path) as (uri, env):
        spec = {
            "model": {"uri": "pvc://models/base", "credentialsSecret": "creds"},
            "adapters": [{"name": "dl", "uri": uri}],
        }
        (dep,) = [c for c in render(isvc_object(spec)) if c["kind"] == "Deployment"]
        (fetcher,) = dep["spec"]["template"]["spec"]["initContainers"]
        rendered_env = {e["name"]: e.get("value") for e in fetcher["env"]}
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "HF_TOKEN"} <= set(rendered_env)  # from the Secret
        command, in_pod = fetcher["command"], adapter_paths(parse_spec(spec))["dl"]
        assert command[-1] == in_pod
        local = str(tmp_path / in_pod.lstrip("/"))  # the pod's emptyDir, here
        done = subprocess.run(
            [sys.executable, "-m", "kubellm.cli", *command[1:-1], local],
            env={**env, **{k: v for k, v in rendered_env.items() if v is not None and k != "HF_HOME"}},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    got = sync(url, {"dl": local, "a2": adapters["a2"]})
    try:
        assert got.loaded == {"dl": local, "a2": adapters["a2"]} and not got.failures
        assert complete(url, "dl") == complete(url, "a2") != complete(url, "tiny")
    finally:
        sync(url, {}, got)
