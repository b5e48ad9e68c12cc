"""InferenceServices whose rendered objects the security scans judge: every shipped example, and a hostile CR
that sets every free-form field (within what the operator accepts)."""

from __future__ import annotations

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def example_specs() -> dict[str, dict]:
    """name → spec of every InferenceService in manifests/examples/."""
    specs = {}
    for path in sorted((ROOT / "manifests/examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "InferenceService":
                specs[doc["metadata"]["name"]] = doc["spec"]
    return specs


def hostile_spec(priority_class: str = "kubellm-test-high", runtime_class: str = "kubellm-test-rc") -> dict:
    """None of these fields may weaken the pod: no way to a privileged, root, host-namespace or token-bearing pod."""
    return {
        "model": {"uri": "hf://a/b", "credentialsSecret": "hf", "downloadSizeLimit": "1Ti"},
        "runtime": {
            "image": "docker.io/someone/anything:1.0",
            "extraArgs": ["--seed", "1", "--enforce-eager", "--chat-template", "{{ messages }}"],
            "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
        },
        "resources": {"gpus": 8, "requests": {"cpu": "64", "memory": "1Ti"}, "limits": {"memory": "1Ti"}},
        "scheduling": {
            "nodeSelector": {"kubernetes.io/hostname": "gpu-8x-a"},
            "tolerations": [{"operator": "Exists"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "priorityClassName": priority_class,
            "runtimeClassName": runtime_class,
        },
        "server": {"apiKeySecret": "keys", "rateLimitRpm": 1},
        "networkPolicy": {"enabled": True, "ingressFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
    }


def scanned_specs() -> dict[str, dict]:
    return {**example_specs(), "hostile": hostile_spec()}
