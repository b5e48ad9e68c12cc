"""render() and compute_status() are pure: every spec → manifest rule and every pod state → condition rule."""

from __future__ import annotations

import datetime as dt
import pathlib

import pytest
import yaml

from kubellm.operator.crd import crd_yaml
from kubellm.operator.render import render
from kubellm.operator.status import compute_status

ROOT = pathlib.Path(__file__).resolve().parents[2]


def isvc(spec: dict, name: str = "chat", generation: int = 1) -> dict:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1", "generation": generation},
        "spec": spec,
    }


def by_kind(children):
    return {c["kind"]: c for c in children}


def test_checked_in_crd_matches_the_pydantic_spec():
    assert (ROOT / "crds/inferenceservices.kubellm.io.yaml").read_text() == crd_yaml(), (
        "crds/ drifted from kubellm/operator/spec.py: run `kubellm crd > crds/inferenceservices.kubellm.io.yaml`"
    )


def test_minimal_spec_gets_defaults_and_all_children():
    kids = by_kind(render(isvc({"model": {"uri": "hf://Qwen/Qwen3-0.6B"}})))
    assert set(kids) == {"Deployment", "Service", "HorizontalPodAutoscaler"}  # 1 replica: no PDB
    for child in kids.values():
        meta = child["metadata"]
        assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"]
        assert meta["labels"]["kubellm.io/inferenceservice"] == "chat"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubellm-operator"
    dep = kids["Deployment"]
    assert "replicas" not in dep["spec"]  # the HPA owns it
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},  # defaults: every container is bounded
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    assert c["args"][:2] == ["serve", "/models/model"]
    assert c["args"][c["args"].index("--served-model-name") + 1] == "chat"
    assert pod["initContainers"][0]["command"] == ["kubellm", "fetch-model", "hf://Qwen/Qwen3-0.6B", "/models/model"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert pod["terminationGracePeriodSeconds"] > 5 + 30  # preStop + drain, with room to exit
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    hpa = kids["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "kubellm_num_requests_waiting"
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    assert [p["name"] for p in kids["Service"]["spec"]["ports"]] == ["http", "metrics"]


def test_full_spec_maps_every_field():
    spec = {
        "model": {"uri": "pvc://store/llama", "name": "llama"},
        "runtime": {
            "image": "reg/rt:2",
            "dtype": "bfloat16",
            "maxModelLen": 4096,
            "maxNumSeqs": 64,
            "maxNumBatchedTokens": 2048,
            "gpuMemoryUtilization": 0.8,
            "enablePrefixCaching": False,
            "schedulingPolicy": "priority",
            "extraArgs": ["--seed", "3"],
            "env": [{"name": "A", "value": "b"}],
        },
        "resources": {
            "gpus": 2,
            "gpuResourceName": "amd.com/gpu",
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"memory": "32Gi"},
        },
        "scheduling": {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
        },
        "autoscaling": {"enabled": False},
        "replicas": 3,
        "server": {"apiKeySecret": "keys", "rateLimitRpm": 60, "maxQueueLength": 10, "drainSeconds": 90},
        "startup": {"timeoutSeconds": 600},
        "rollout": {"strategy": "Surge"},
    }
    kids = by_kind(render(isvc(spec)))
    assert set(kids) == {"Deployment", "Service", "PodDisruptionBudget"}  # no HPA; 3 replicas: a PDB
    dep = kids["Deployment"]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert args[1] == "/models/llama" and "initContainers" not in pod
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "store", "readOnly": True}
    for flag, value in [
        ("--served-model-name", "llama"),
        ("--dtype", "bfloat16"),
        ("--max-model-len", "4096"),
        ("--max-num-seqs", "64"),
        ("--max-num-batched-tokens", "2048"),
        ("--gpu-memory-utilization", "0.8"),
        ("--scheduling-policy", "priority"),
        ("--rate-limit-rpm", "60.0"),
        ("--max-waiting-requests", "10"),
        ("--drain-timeout-s", "90"),
        ("--api-key-file", "/etc/kubellm/api-keys/keys"),
        ("--seed", "3"),
        ("--tensor-parallel-size", "2"),
    ]:
        assert args[args.index(flag) + 1] == value, flag
    assert "--no-enable-prefix-caching" in args
    assert c["image"] == "reg/rt:2"
    assert c["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"memory": "32Gi", "amd.com/gpu": "2"},
    }
    assert {"name": "A", "value": "b"} in c["env"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["priorityClassName"] == "high" and pod["runtimeClassName"] == "nvidia"
    assert pod["terminationGracePeriodSeconds"] >= 5 + 90
    assert c["startupProbe"]["failureThreshold"] == 60
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert {"name": "api-keys", "secret": {"secretName": "keys"}} in pod["volumes"]


def test_cpu_only_and_recreate():
    kids = by_kind(
        render(isvc({"model": {"uri": "s3://bucket/m"}, "resources": {"gpus": 0}, "rollout": {"strategy": "Recreate"}}))
    )
    c = kids["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"memory": "16Gi"} and c["args"][c["args"].index("--device") + 1] == "cpu"
    assert kids["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}


def pod(ready=False, scheduled=None, waiting=None, terminated=None, age_s=10):
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if scheduled:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": scheduled})
    cs = {
        "name": "runtime",
        "state": {"waiting": {"reason": waiting}} if waiting else {},
        "lastState": {"terminated": {"reason": terminated}} if terminated else {},
    }
    return {
        "metadata": {"name": "p", "creationTimestamp": start},
        "status": {"conditions": conditions, "containerStatuses": [cs], "startTime": start},
    }


@pytest.mark.parametrize(
    "shape,reason",  # the pod is made when the test runs: its age must not grow with the suite's run time
    [
        ({"scheduled": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}, "InsufficientGPU"),
        ({"scheduled": "0/4 nodes are available: 4 node(s) didn't match Pod's node affinity."}, "Unschedulable"),
        ({"waiting": "ImagePullBackOff"}, "ImagePullBackOff"),
        ({"waiting": "CrashLoopBackOff"}, "CrashLoopBackOff"),
        ({"waiting": "CrashLoopBackOff", "terminated": "OOMKilled"}, "OOMKilled"),
        ({"age_s": 4000}, "StartupTimeout"),
        ({"age_s": 10}, "Starting"),
    ],
)
def test_not_ready_reasons_come_from_the_pods(shape, reason):
    s = compute_status(
        isvc({"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": False}}),
        {"status": {"replicas": 1, "readyReplicas": 0}},
        None,
        [pod(**shape)],
    )
    ready = s["conditions"][0]
    assert ready["type"] == "Ready" and ready["status"] == "False" and ready["reason"] == reason


def test_ready_needs_a_ready_replica_and_an_active_autoscaler():
    spec = {"model": {"uri": "hf://a/b", "name": "served"}}
    dep = {"status": {"replicas": 2, "readyReplicas": 1}}
    hpa_ok = {"status": {"conditions": [{"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound"}]}}
    hpa_bad = {
        "status": {
            "conditions": [
                {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric", "message": "no metrics"}
            ]
        }
    }
    s = compute_status(isvc(spec), dep, hpa_ok, [pod(ready=True)])
    assert [(c["type"], c["status"]) for c in s["conditions"]] == [
        ("Ready", "True"),
        ("WorkloadReady", "True"),
        ("AutoscalerReady", "True"),
    ]
    assert s["url"] == "http://chat.team-a.svc.cluster.local" and s["modelName"] == "served"
    assert s["readyReplicas"] == 1 and s["selector"].startswith("kubellm.io/inferenceservice=chat")
    bad = compute_status(isvc(spec), dep, hpa_bad, [pod(ready=True)])
    assert bad["conditions"][0]["status"] == "False" and bad["conditions"][0]["reason"] == "FailedGetPodsMetric"


def example_services():
    """(path, InferenceService) of every example; an example file may hold other objects (a Secret)."""
    for path in sorted((ROOT / "manifests/examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "InferenceService":
                yield path, doc


def test_examples_are_valid_specs():
    found = list(example_services())
    assert len(found) >= 3
    for path, doc in found:
        kids = render({**doc, "metadata": {**doc["metadata"], "namespace": "x", "uid": "u"}})
        assert kids[0]["kind"] == "Deployment", path


def test_the_minimal_example_has_an_api_key_from_its_secret():
    docs = list(yaml.safe_load_all((ROOT / "manifests/examples/minimal.yaml").read_text()))
    secret = next(d for d in docs if d["kind"] == "Secret")
    svc = next(d for d in docs if d["kind"] == "InferenceService")
    assert svc["spec"]["server"]["apiKeySecret"] == secret["metadata"]["name"]
    assert secret["stringData"]["keys"].strip()
    pod = render({**svc, "metadata": {**svc["metadata"], "namespace": "x", "uid": "u"}})[0]["spec"]["template"]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--api-key-file") + 1] == "/etc/kubellm/api-keys/keys"


def test_runtime_pods_are_bounded_and_carry_no_token():
    """No ServiceAccount token; requests and limits on every container; every emptyDir has a sizeLimit."""
    for spec in (
        {"model": {"uri": "hf://a/b"}},
        {"model": {"uri": "s3://b/m", "downloadSizeLimit": "50Gi"}, "resources": {"gpus": 4}},
        {"model": {"uri": "pvc://c/m"}, "resources": {"gpus": 0, "requests": {"memory": "40Gi"}}},
    ):
        pod = by_kind(render(isvc(spec)))["Deployment"]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            r = c["resources"]
            assert {"cpu", "memory"} <= set(r["requests"]) and "memory" in r["limits"], c["name"]
        for v in pod["volumes"]:
            if "emptyDir" in v:
                assert v["emptyDir"]["sizeLimit"], v
    s3 = by_kind(render(isvc({"model": {"uri": "s3://b/m", "downloadSizeLimit": "50Gi"}, "resources": {"gpus": 4}})))
    vols = {v["name"]: v for v in s3["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert vols["model"]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}  # 2 GiB per GPU
    for asked, limit in (("40Gi", "40Gi"), ("256Mi", "16Gi"), ("20G", "20G"), ("1.5e10", "16Gi")):
        big = by_kind(render(isvc({"model": {"uri": "pvc://c/m"}, "resources": {"requests": {"memory": asked}}})))
        r = big["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert r["limits"]["memory"] == limit, asked  # the default, never below the request
    capped = by_kind(
        render(isvc({"model": {"uri": "hf://a/b"}, "resources": {"limits": {"cpu": "2", "memory": "8Gi"}}}))
    )
    r = capped["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert r["requests"] == {} and r["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}


def test_network_policy_is_optional_and_narrow():
    assert "NetworkPolicy" not in by_kind(render(isvc({"model": {"uri": "hf://a/b"}})))
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    np = by_kind(
        render(isvc({"model": {"uri": "hf://a/b"}, "networkPolicy": {"enabled": True, "ingressFrom": [peer]}}))
    )["NetworkPolicy"]
    assert np["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = np["spec"]
    assert spec["podSelector"]["matchLabels"]["kubellm.io/inferenceservice"] == "chat"
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    operator = {  # the operator reads the pods' /metrics (custom metrics API)
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubellm-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubellm-operator"}},
    }
    router = {**operator, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubellm-router"}}}
    assert spec["ingress"] == [
        {"from": [{"podSelector": {}}, operator, router, peer], "ports": [{"protocol": "TCP", "port": 8000}]}
    ]
    assert [p["port"] for rule in spec["egress"] for p in rule["ports"]] == [53, 53, 443]  # DNS, the download
    pvc = by_kind(render(isvc({"model": {"uri": "pvc://c/m"}, "networkPolicy": {"enabled": True}})))["NetworkPolicy"]
    assert [p["port"] for rule in pvc["spec"]["egress"] for p in rule["ports"]] == [53, 53]  # nothing to fetch


def test_the_network_policy_admits_the_operators_pods_as_installed():
    from kubellm.operator.render import OPERATOR_POD_LABELS

    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/operator.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert OPERATOR_POD_LABELS.items() <= labels.items() and dep["metadata"]["namespace"] == "kubellm-system"


def test_the_downloader_gets_only_the_credential_keys_of_its_secret():
    spec = {"model": {"uri": "s3://bucket/m", "credentialsSecret": "creds"}}
    init = by_kind(render(isvc(spec)))["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    assert "envFrom" not in init  # a Secret's every key as a variable would let it set LD_PRELOAD and the like
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"] if "valueFrom" in e}
    assert set(refs) >= {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert all(r == {"name": "creds", "key": k, "optional": True} for k, r in refs.items())


def test_scale_to_zero_keeps_the_hpa_at_one_or_more():
    zero = by_kind(render(isvc({"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}})))
    assert (
        zero["HorizontalPodAutoscaler"]["spec"]["minReplicas"],
        zero["HorizontalPodAutoscaler"]["spec"]["maxReplicas"],
    ) == (1, 3)
    assert "replicas" not in zero["Deployment"]["spec"]  # the HPA (1..N) and the router (0 <-> 1) own it
    assert "PodDisruptionBudget" not in zero


def test_runtime_pods_say_which_metric_names_they_export():
    d = by_kind(render(isvc({"model": {"uri": "hf://a/b"}})))["Deployment"]
    assert d["spec"]["template"]["metadata"]["labels"]["llm-d.ai/engine-type"] == "vllm"
    assert "llm-d.ai/engine-type" not in d["spec"]["selector"]["matchLabels"]


def test_an_inference_pool_for_a_gateway_endpoint_picker_is_an_option():
    assert "InferencePool" not in by_kind(render(isvc({"model": {"uri": "hf://a/b"}})))
    spec = {"model": {"uri": "hf://a/b"}, "inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp"}}}
    pool = by_kind(render(isvc(spec)))["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pool["spec"] == {
        "selector": {
            "matchLabels": {"kubellm.io/inferenceservice": "chat", "app.kubernetes.io/name": "kubellm-runtime"}
        },
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "epp", "kind": "Service", "port": {"number": 9002}, "failureMode": "FailClose"},
    }


def test_the_operators_otlp_endpoint_reaches_every_runtime_pod(monkeypatch):
    from kubellm.operator import render as r

    spec = {"model": {"uri": "hf://a/b"}, "networkPolicy": {"enabled": True}}
    off = by_kind(render(isvc(spec)))
    (container,) = off["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert not [e for e in container["env"] if e["name"].startswith("OTEL_")]  # off by default: nothing exported
    monkeypatch.setattr(r, "OTLP_TRACES_ENDPOINT", "http://collector.monitoring:4318/v1/traces")
    on = by_kind(render(isvc(spec)))
    (container,) = on["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://collector.monitoring:4318/v1/traces"
    assert env["OTEL_SERVICE_NAME"] == "chat"
    assert [p["port"] for rule in on["NetworkPolicy"]["spec"]["egress"] for p in rule["ports"]] == [53, 53, 443, 4318]
    # a service's own value wins, once
    own = {**spec, "runtime": {"env": [{"name": "OTEL_SERVICE_NAME", "value": "chat-canary"}]}}
    (container,) = by_kind(render(isvc(own)))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert [e["value"] for e in container["env"] if e["name"] == "OTEL_SERVICE_NAME"] == ["chat-canary"]
