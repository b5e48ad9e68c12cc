"""spec.adapters: rendering (flags, mounts, the paths the pods are asked to load), the pure plan of loads and
unloads per pod, and what the status says (replicaAdapters, AdaptersReady outside Ready)."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from kubellm.operator.adapters import RETRY_FAILED_S, Action, Failure, PodAdapters, adapter_status, plan
from kubellm.operator.policy import Refused
from kubellm.operator.render import adapter_paths, lora_slots, render
from kubellm.operator.serve_flags import allowed_extra_flags
from kubellm.operator.spec import parse_spec
from kubellm.operator.status import compute_status
from tests.support.recording_api import recording_reconciler

TWO = [{"name": "sql", "uri": "pvc://models/adapters/sql"}, {"name": "chat-fr", "uri": "pvc://loras/fr/v2"}]


def isvc(spec: dict) -> dict:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1", "generation": 3},
        "spec": spec,
    }


def pod_spec(spec: dict) -> dict:
    (dep,) = [c for c in render(isvc(spec)) if c["kind"] == "Deployment"]
    return dep["spec"]["template"]["spec"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_adapters_turn_lora_on_with_slots_rounded_up_and_runtime_updates():
    spec = {"model": {"uri": "pvc://models/base"}, "adapters": TWO, "runtime": {"maxLoraRank": 32}}
    args = pod_spec(spec)["containers"][0]["args"]
    assert "--enable-lora" in args and "--allow-runtime-lora-updating" in args
    assert flag(args, "--max-loras") == "4" and flag(args, "--max-lora-rank") == "32"
    assert "--lora-modules" not in args  # loaded through the API: a change of the list rolls no pod
    five = [{"name": f"a{i}", "uri": f"pvc://models/a{i}"} for i in range(5)]
    assert lora_slots(parse_spec({"model": {"uri": "pvc://models/base"}, "adapters": five})) == 8


def test_the_pods_take_the_operators_admin_key_from_its_secret():
    spec = {"model": {"uri": "pvc://models/base"}, "adapters": TWO, "server": {"apiKeySecret": "client-keys"}}
    pod = pod_spec(spec)
    assert flag(pod["containers"][0]["args"], "--admin-key-file") == "/etc/kubellm/admin-key/key"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["admin-key"]["secret"] == {"secretName": "chat-admin-key"}
    assert vols["api-keys"]["secret"] == {"secretName": "client-keys"}  # the clients' keys, beside it
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["admin-key"] == {"name": "admin-key", "mountPath": "/etc/kubellm/admin-key", "readOnly": True}
    plain = pod_spec({"model": {"uri": "pvc://models/base"}})
    assert "admin-key" not in {v["name"] for v in plain["volumes"]}
    assert "--admin-key-file" not in plain["containers"][0]["args"]


def test_the_admin_key_secret_is_made_once_kept_and_removed_with_lora():
    r, api = recording_reconciler()
    obj = isvc({"model": {"uri": "pvc://models/base"}, "adapters": TWO, "autoscaling": {"enabled": False}})
    api.isvc = obj
    r.reconcile(obj)
    secret = api.store[("Secret", "team-a", "chat-admin-key")]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # garbage-collected with the service
    key = r.admin_key(obj)
    assert len(key) >= 32 and r.admin_key(obj) == key
    r.reconcile(obj)  # kept: the pods' mounted key stays valid
    assert r.admin_key(obj) == key
    del api.store[("Secret", "team-a", "chat-admin-key")]  # deleted by hand: made again, with a new key
    assert r.admin_key(obj) not in ("", key)
    off = isvc({"model": {"uri": "pvc://models/base"}, "autoscaling": {"enabled": False}})
    assert "-Secret" in r.reconcile(off).changed and ("Secret", "team-a", "chat-admin-key") not in api.store


def test_a_strangers_secret_of_that_name_is_a_conflict_and_nothing_is_written():
    r, api = recording_reconciler()
    obj = isvc({"model": {"uri": "pvc://models/base"}, "adapters": TWO})
    api.isvc = obj
    stranger = {"metadata": {"name": "chat-admin-key", "namespace": "team-a", "uid": "x"}, "data": {"key": "eA=="}}
    api.store[("Secret", "team-a", "chat-admin-key")] = stranger
    with pytest.raises(Refused) as e:
        r.reconcile(obj)
    assert e.value.reason == "ChildConflict" and "Secret team-a/chat-admin-key" in e.value.message
    assert {verb for _, verb in api.calls} == {"get"} and ("Deployment", "team-a", "chat") not in api.store
    assert r.delete_children(obj) == [] and api.store[("Secret", "team-a", "chat-admin-key")] is stranger


def test_no_adapters_no_lora_unless_slots_are_asked_for():
    args = pod_spec({"model": {"uri": "pvc://models/base"}})["containers"][0]["args"]
    assert "--enable-lora" not in args and "--allow-runtime-lora-updating" not in args
    args = pod_spec({"model": {"uri": "pvc://models/base"}, "runtime": {"maxLoras": 2}})["containers"][0]["args"]
    assert flag(args, "--max-loras") == "2" and "--allow-runtime-lora-updating" in args


def test_the_models_claim_is_reused_and_other_claims_are_mounted_read_only():
    spec = {"model": {"uri": "pvc://models/base"}, "adapters": TWO}
    pod = pod_spec(spec)
    assert adapter_paths(parse_spec(spec)) == {"sql": "/models/adapters/sql", "chat-fr": "/adapters/loras/fr/v2"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["adapters-0"]["persistentVolumeClaim"] == {"claimName": "loras", "readOnly": True}
    assert [v for v in vols.values() if v.get("persistentVolumeClaim", {}).get("claimName") == "models"] == [
        vols["model"]
    ]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["adapters-0"] == {"name": "adapters-0", "mountPath": "/adapters/loras", "readOnly": True}


def test_a_downloaded_model_keeps_its_init_mounts_and_adapters_get_their_claim():
    spec = {"model": {"uri": "hf://org/base"}, "adapters": TWO[:1]}
    pod = pod_spec(spec)
    assert adapter_paths(parse_spec(spec)) == {"sql": "/adapters/models/adapters/sql"}
    assert [m["name"] for m in pod["initContainers"][0]["volumeMounts"]] == ["model", "tmp"]


def test_downloaded_adapters_are_fetched_by_init_containers_with_the_models_credentials():
    spec = {
        "model": {"uri": "pvc://models/base", "credentialsSecret": "s3-creds"},
        "adapters": [{"name": "s3a", "uri": "s3://loras/sql"}, {"name": "fr", "uri": "hf://org/fr@v2"}, TWO[0]],
        "networkPolicy": {"enabled": True},
    }
    assert adapter_paths(parse_spec(spec)) == {
        "s3a": "/adapter-downloads/s3a",
        "fr": "/adapter-downloads/fr",
        "sql": "/models/adapters/sql",
    }
    pod = pod_spec(spec)
    fetchers = [c for c in pod.get("initContainers", []) if c["name"].startswith("fetch-adapter")]
    assert [c["command"] for c in fetchers] == [
        ["kubellm", "fetch-model", "s3://loras/sql", "/adapter-downloads/s3a"],
        ["kubellm", "fetch-model", "hf://org/fr@v2", "/adapter-downloads/fr"],
    ]
    secret_keys = {e["valueFrom"]["secretKeyRef"]["name"] for e in fetchers[0]["env"] if "valueFrom" in e}
    assert secret_keys == {"s3-creds"}
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in fetchers[1]["env"]  # the image's default is offline
    runtime_mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert runtime_mounts["adapter-downloads"]["readOnly"] is True
    assert {m["name"]: m.get("readOnly", False) for m in fetchers[0]["volumeMounts"]}["adapter-downloads"] is False
    (netpol,) = [c for c in render(isvc(spec)) if c["kind"] == "NetworkPolicy"]
    assert {"ports": [{"protocol": "TCP", "port": 443}]} in netpol["spec"]["egress"]  # the model is on a PVC
    assert "initContainers" not in pod_spec({"model": {"uri": "pvc://models/base"}, "adapters": TWO})


@pytest.mark.parametrize(
    "adapters",
    [
        [{"name": "-bad", "uri": "pvc://models/x"}],
        [{"name": "a" * 129, "uri": "pvc://models/x"}],
    ],
)
def test_the_spec_refuses_bad_adapter_names(adapters):
    with pytest.raises(ValidationError):
        parse_spec({"model": {"uri": "pvc://models/base"}, "adapters": adapters})


def test_lora_flags_are_the_operators_not_extra_args():
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank", "--lora-modules"} & set(allowed_extra_flags())
    assert "--allow-runtime-lora-updating" not in allowed_extra_flags()


# ------------------------------------------------------------------ plan
def test_plan_loads_whats_missing_and_unloads_whats_gone_unloads_first():
    desired = {"a": "/m/a", "b": "/m/b"}
    assert plan(desired, {}, {}, 0.0) == [Action("load", "a", "/m/a"), Action("load", "b", "/m/b")]
    assert plan(desired, {"a": "/m/a", "b": "/m/b"}, {}, 0.0) == []  # idempotent
    assert plan({"a": "/m/a"}, {"a": "/m/a", "b": "/m/b"}, {}, 0.0) == [Action("unload", "b")]
    assert plan({"c": "/m/c"}, {"a": "/m/a"}, {}, 0.0) == [Action("unload", "a"), Action("load", "c", "/m/c")]


def test_plan_reloads_an_adapter_whose_path_changed():
    assert plan({"a": "/m/a2"}, {"a": "/m/a1"}, {}, 0.0) == [Action("unload", "a"), Action("load", "a", "/m/a2")]


def test_plan_waits_before_retrying_a_refused_load_unless_the_path_changed():
    failed = {"a": Failure("/m/a", "400: max_lora_rank: rank 32 > 16", at=100.0)}
    assert plan({"a": "/m/a"}, {}, failed, 100.0 + RETRY_FAILED_S / 2) == []
    assert plan({"a": "/m/a"}, {}, failed, 100.0 + RETRY_FAILED_S + 1) == [Action("load", "a", "/m/a")]
    assert plan({"a": "/m/other"}, {}, failed, 101.0) == [Action("load", "a", "/m/other")]


# ------------------------------------------------------------------ status
def test_status_lists_each_replicas_adapters_and_says_when_all_are_loaded():
    desired = {"a": "/m/a", "b": "/m/b"}
    pods = {"p1": PodAdapters({"a": "/m/a", "b": "/m/b"}), "p0": PodAdapters({"a": "/m/a"})}
    replicas, cond = adapter_status(desired, pods)
    assert replicas == [{"pod": "p0", "adapters": ["a"]}, {"pod": "p1", "adapters": ["a", "b"]}]
    assert cond[:2] == (False, "Syncing") and "p0" in cond[2] and "b" in cond[2]
    pods["p0"] = PodAdapters(dict(desired))
    assert adapter_status(desired, pods)[1] == (True, "Loaded", "2 adapters on 2 Ready replicas")
    assert adapter_status({}, {"p0": PodAdapters()}) == ([{"pod": "p0", "adapters": []}], None)


def test_a_refused_load_is_the_condition_with_the_runtimes_message():
    pods = {"p0": PodAdapters({"a": "/m/a"}, {"b": Failure("/m/b", "400: max_lora_rank: rank 32 > 16", 0.0)})}
    _, cond = adapter_status({"a": "/m/a", "b": "/m/b"}, pods)
    assert cond == (False, "AdapterLoadFailed", "adapter b on pod p0: 400: max_lora_rank: rank 32 > 16")
    _, cond = adapter_status({"a": "/m/a"}, {"p0": PodAdapters(unreachable="GET /v1/models: timeout")})
    assert cond == (None, "PodUnreachable", "pod p0: GET /v1/models: timeout")


def _ready_deployment():
    return {"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1}}


def _hpa():
    return {"status": {"conditions": [{"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound"}]}}


def test_a_failed_adapter_leaves_the_service_ready():
    obj = isvc({"model": {"uri": "pvc://models/base"}, "adapters": TWO[:1]})
    failure = Failure("/models/adapters/sql", "400: lora_path: no adapter_config.json", 0.0)
    now = dt.datetime.now(dt.UTC)
    status = compute_status(
        obj, _ready_deployment(), _hpa(), [], now, adapters={"p0": PodAdapters({}, {"sql": failure})}
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["AdaptersReady"]["status"] == "False" and conds["AdaptersReady"]["reason"] == "AdapterLoadFailed"
    assert "no adapter_config.json" in conds["AdaptersReady"]["message"]
    assert status["replicaAdapters"] == [{"pod": "p0", "adapters": []}]
    plain = compute_status(isvc({"model": {"uri": "pvc://models/base"}}), _ready_deployment(), _hpa(), [], now)
    assert plain["replicaAdapters"] == [] and "AdaptersReady" not in {c["type"] for c in plain["conditions"]}
