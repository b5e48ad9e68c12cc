"""LoRA adapters from the CRD on real pods (issue 19's must-show): an InferenceService with two adapters (PEFT
directories with random B matrices, on the node's local PersistentVolume beside the tiny model) and client API
keys (server.apiKeySecret) — the in-cluster operator loads both onto the Ready pod through its API with the pods'
admin key (a Secret it makes; a client's key may not load or unload: 403); each answers through the Service and
through `kubellm router` (which learns where adapters are from the status, as the pods refuse it their model
list) with the openai client, differently from the base model; removing one from the spec unloads it (404 for
it, through both) without restarting the pod."""

from __future__ import annotations

import subprocess
import time

import httpx
import openai
import pytest

from tests.support.api import greedy_token_ids
from tests.support.lora import make_adapter
from tests.support.node_k8s import P, apply, client_for, get, isvc, ready_pods, service_client, wait_isvc_ready
from tests.support.router import KubeRouterProcess
from tests.support.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(1200)]
RUNTIME = {"maxModelLen": 512, "maxNumSeqs": 4, "maxNumBatchedTokens": 512, "maxLoraRank": 8}
KEY = "node-client-key"
SERVER = {"drainSeconds": 60, "apiKeySecret": "lora-keys"}


@pytest.fixture
def adapters_pv(models_pv):
    """Two adapters of the tiny model under adapters/ on the models PV (made on this host with PEFT)."""
    root = models_pv / "adapters"
    for name, seed, rank in (("a1", 31, 8), ("a2", 32, 4)):
        if not (root / name / "adapter_config.json").exists():
            make_adapter(str(models_pv / "tiny"), str(root / name), rank=rank, seed=seed)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return root


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def wait_adapters(kubectl, ns: str, name: str, want: list[str], timeout: float = 180) -> dict:
    def synced():
        o = get(kubectl, P, name, "-n", ns)
        replicas = (o.get("status") or {}).get("replicaAdapters") or []
        ok = condition(o, "AdaptersReady").get("status") == "True" and replicas
        return o if ok and all(r["adapters"] == want for r in replicas) else None

    return wait_until(synced, timeout=timeout, interval=1, what=f"{ns}/{name} replicas holding {want}")


def router_models(router) -> dict[str, str | None]:
    return {m["id"]: m.get("parent") for m in httpx.get(router.url + "/v1/models", timeout=10).json()["data"]}


def test_adapters_from_the_crd_serve_through_service_and_router_and_removal_unloads(
    operator_installed, kubectl, namespace, adapters_pv, real
):
    ns, adapters = namespace, [{"name": n, "uri": f"pvc://models/adapters/{n}"} for n in ("a1", "a2")]
    kubectl("create", "secret", "generic", "lora-keys", f"--from-literal=keys={KEY}", "-n", ns)
    apply(kubectl, ns, isvc("lora", "tiny", runtime=RUNTIME, adapters=adapters, server=SERVER))
    wait_isvc_ready(kubectl, ns, "lora", timeout=600)
    t_ready = time.monotonic()
    obj = wait_adapters(kubectl, ns, "lora", ["a1", "a2"])
    print(f"[node] adapters: both loaded {time.monotonic() - t_ready:.1f}s after Ready")
    (pod,) = ready_pods(kubectl, ns, "lora")
    assert obj["status"]["replicaAdapters"] == [{"pod": pod["metadata"]["name"], "adapters": ["a1", "a2"]}]
    assert condition(obj, "Ready")["status"] == "True"

    service = service_client(kubectl, ns, "lora", KEY)
    with pytest.raises(openai.AuthenticationError):
        service_client(kubectl, ns, "lora").models.list()
    with pytest.raises(openai.PermissionDeniedError):  # a client's key: the adapters are the operator's
        service.post("/unload_lora_adapter", body={"lora_name": "a1"}, cast_to=httpx.Response)
    assert {m.id: m.model_extra.get("parent") for m in service.models.list()} == {
        "lora": None,
        "a1": "lora",
        "a2": "lora",
    }
    outputs = {m: greedy_token_ids(service, m) for m in ("lora", "a1", "a2")}
    assert all(len(v) == 8 for v in outputs.values())
    assert len({tuple(v) for v in outputs.values()}) == 3, outputs  # each adapter changes the base's output

    router = KubeRouterProcess(str(real[0].kubeconfig), ns)
    try:
        wait_until(
            lambda: router_models(router) == {"lora": None, "a1": "lora", "a2": "lora"},
            timeout=60,
            what="the router to list both adapters",
        )
        via_router = client_for("127.0.0.1", router.port, KEY)
        for m in ("lora", "a1", "a2"):
            assert greedy_token_ids(via_router, m) == outputs[m]

        # a2 removed from the spec: unloaded from the running pod, 404 through the Service and the router
        apply(kubectl, ns, isvc("lora", "tiny", runtime=RUNTIME, adapters=adapters[:1], server=SERVER))
        t_removed = time.monotonic()
        wait_adapters(kubectl, ns, "lora", ["a1"])
        print(f"[node] adapters: a2 unloaded {time.monotonic() - t_removed:.1f}s after the spec change")
        with pytest.raises(openai.NotFoundError):
            greedy_token_ids(service, "a2")
        wait_until(lambda: "a2" not in router_models(router), timeout=30, what="a2 gone from the router")
        with pytest.raises(openai.NotFoundError):
            greedy_token_ids(via_router, "a2")
        assert greedy_token_ids(via_router, "a1") == outputs["a1"]
        assert greedy_token_ids(service, "lora") == outputs["lora"]
    finally:
        router.stop()
    (after,) = ready_pods(kubectl, ns, "lora")  # the same pod, never restarted: the list is not in the template
    assert after["metadata"]["name"] == pod["metadata"]["name"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
