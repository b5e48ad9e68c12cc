"""spec.adapters on a real control plane (KWOK pods: nothing serves at their IPs): the API refuses bad adapter
lists with the CRD's messages; the operator renders LoRA flags and the adapters' claim; its adapter sync runs
against the Ready pods and the status reports each replica and an AdaptersReady condition that leaves Ready alone;
an adapter list that empties takes LoRA off again (and the Secret with the pods' admin key, made for LoRA, goes).
Adapters combine with server.apiKeySecret: the operator loads them with that admin key, not a client's. Loading
onto real pods: tests/node/test_adapters_node.py."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.isvc import G, P, V, condition, create_isvc, custom, get_isvc, wait_ready
from tests.support.kube import make_pvc, wait_for

pytestmark = pytest.mark.cluster
BASE = {"model": {"uri": "hf://org/base"}, "resources": {"gpus": 0}, "autoscaling": {"enabled": False}}


@pytest.mark.parametrize(
    "adapters, extra, message",
    [
        ([{"name": "x", "uri": "https://example.com/adapter"}], {}, "adapters[].uri must be pvc://claim/path"),
        ([{"name": "x", "uri": "pvc://loras"}], {}, "adapters[].uri must be pvc://claim/path"),
        ([{"name": "x", "uri": "pvc://loras/a"}, {"name": "x", "uri": "pvc://loras/b"}], {}, "Duplicate value"),
        ([{"name": "base", "uri": "pvc://loras/a"}], {"model": {"uri": "hf://org/base", "name": "base"}}, "differ"),
        (
            [{"name": f"a{i}", "uri": f"pvc://loras/{i}"} for i in range(3)],
            {"runtime": {"maxLoras": 2}},
            "adapters must not outnumber runtime.maxLoras",
        ),
    ],
)
def test_bad_adapter_lists_are_refused_by_the_api(crd_installed, namespace, adapters, extra, message):
    with pytest.raises(ApiException) as err:
        create_isvc(namespace, "bad", {**BASE, **extra, "adapters": adapters})
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def _args(ns: str, name: str) -> list[str]:
    return client.AppsV1Api().read_namespaced_deployment(name, ns).spec.template.spec.containers[0].args


def test_adapters_render_sync_onto_ready_pods_and_report_per_replica(operator, namespace):
    make_pvc(namespace, "loras")
    adapters = [{"name": "sql", "uri": "pvc://loras/sql"}, {"name": "fr", "uri": "hf://org/fr-adapter"}]
    server = {"apiKeySecret": "client-keys"}  # client keys: the operator loads with its own admin key
    create_isvc(namespace, "chat", {**BASE, "replicas": 2, "adapters": adapters, "server": server})
    wait_ready(namespace, "chat")
    args = _args(namespace, "chat")
    assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--admin-key-file") + 1] == "/etc/kubellm/admin-key/key"
    secret = client.CoreV1Api().read_namespaced_secret("chat-admin-key", namespace)
    assert [o.uid for o in secret.metadata.owner_references] == [get_isvc(namespace, "chat")["metadata"]["uid"]]
    assert len(secret.data["key"]) >= 40  # base64 of a random 32-byte key
    pod = client.AppsV1Api().read_namespaced_deployment("chat", namespace).spec.template.spec
    assert [v.persistent_volume_claim.claim_name for v in pod.volumes if v.name.startswith("adapters-")] == ["loras"]
    (fetch,) = [c for c in pod.init_containers if c.name.startswith("fetch-adapter")]
    assert fetch.command[-2:] == ["hf://org/fr-adapter", "/adapter-downloads/fr"]

    # the sync reached for both Ready pods (KWOK's IPs answer nothing): each replica listed, holding nothing yet,
    # the condition says so, and the model stays Ready
    pod_names = {p.metadata.name for p in client.CoreV1Api().list_namespaced_pod(namespace).items}
    obj = wait_for(
        "the adapter status of both replicas",
        lambda: (
            (o := get_isvc(namespace, "chat"))
            and {r["pod"] for r in o["status"].get("replicaAdapters", [])} == pod_names
            and condition(o, "AdaptersReady")
            and o
        ),
        timeout=60,
    )
    assert all(r["adapters"] == [] for r in obj["status"]["replicaAdapters"])
    assert condition(obj, "AdaptersReady")["status"] == "Unknown"
    assert condition(obj, "AdaptersReady")["reason"] == "PodUnreachable"
    assert condition(obj)["status"] == "True"

    # no adapters any more and no maxLoras: LoRA off, the condition and the per-replica list gone
    custom().patch_namespaced_custom_object(G, V, namespace, P, "chat", {"spec": {"adapters": []}})
    wait_for("LoRA off", lambda: "--enable-lora" not in _args(namespace, "chat"))
    wait_for(
        "the admin key's Secret to go with LoRA",
        lambda: (
            "chat-admin-key"
            not in {s.metadata.name for s in client.CoreV1Api().list_namespaced_secret(namespace).items}
        ),
    )
    wait_for(
        "the adapter status to clear",
        lambda: (
            (o := get_isvc(namespace, "chat"))
            and not condition(o, "AdaptersReady")
            and o["status"].get("replicaAdapters") == []
        ),
        timeout=60,
    )
