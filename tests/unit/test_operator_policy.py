"""What a CR may ask for: extraArgs parsed by the serve parser itself (no abbreviations), operator-owned env
refused, the admin's allow-list; the operator stays free of torch; its log lines are JSON."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import subprocess
import sys

import pytest

from kubellm.operator.admission_policy import CHECKS, admission_policy, configmap_of, policy_yaml
from kubellm.operator.main import JsonFormatter
from kubellm.operator.policy import POLICY_KEYS, Policy, Refused, admit, check_extra_args, policy_from_configmap
from kubellm.operator.serve_flags import allowed_extra_flags, extra_args_rule, serve_flags
from kubellm.operator.spec import parse_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAG_REFUSALS = [
    ["--po", "9999"],  # argparse would read these abbreviations as --port, --host, --tensor-parallel-size
    ["--ho", "0.0.0.0"],
    ["--tensor", "8"],
    ["--port=9"],
    ["--host", "1.2.3.4"],
    ["--tensor-parallel-size", "8"],
    ["--config", "/models/model/evil.yaml"],  # a settings file can set host, port, …
    ["--api-key", "k"],
    ["--drain-timeout", "1"],  # an alias of --drain-timeout-s
    ["--no-enable-prefix-caching"],  # runtime.enablePrefixCaching is the one way
    ["--device", "cpu"],
    ["-h"],  # exits before serving
    ["--", "--port", "9"],
]
REFUSED_ARGS = FLAG_REFUSALS + [["--seed", "x"], ["stray"]]  # a bad value, a second positional
ALLOWED_ARGS = [["--seed", "3"], ["--seed=-1"], ["--enforce-eager"], ["--swap-space", "2"], ["--kernels", "triton"]]


@pytest.mark.parametrize("args", REFUSED_ARGS, ids=" ".join)
def test_extra_args_that_set_operator_owned_settings_or_do_not_parse_are_refused(args):
    with pytest.raises(Refused) as e:
        check_extra_args(args)
    assert e.value.reason == "InvalidRuntimeArgs"


@pytest.mark.parametrize("args", ALLOWED_ARGS, ids=" ".join)
def test_other_serve_flags_pass(args):
    check_extra_args(args)


def test_the_crd_rule_on_extra_args_agrees_with_the_parser():
    """The admission-time rule (CEL, regenerated from the parser) refuses what the operator refuses for flags;
    CEL's matches() is RE2, which Python's re agrees with on these patterns."""
    rule = extra_args_rule()
    allowed_re = re.search(r"a\.matches\('(\^\(--.*)'\)\)$", rule).group(1)

    def cel(args):
        return all(not a.startswith("-") or re.match(r"^-[0-9.]", a) or re.match(allowed_re, a) for a in args)

    for args in FLAG_REFUSALS:
        assert not cel(args), args
    for args in ALLOWED_ARGS:
        assert cel(args), args
    assert "--port" in serve_flags() and "--port" not in allowed_extra_flags()


@pytest.mark.parametrize(
    "name", ["KUBELLM_TENSOR_PARALLEL_SIZE", "KUBELLM_PORT", "kubellm_host", "LD_PRELOAD", "PYTHONPATH", "HF_HOME"]
)
def test_env_of_operator_owned_settings_is_refused(name):
    spec = parse_spec(
        {"model": {"uri": "hf://a/b"}, "runtime": {"env": [{"name": "OK", "value": "1"}, {"name": name}]}}
    )
    with pytest.raises(Refused) as e:
        admit(spec, Policy())
    assert e.value.reason == "ForbiddenEnv" and name in e.value.message


HOSTILE = {
    "model": {"uri": "hf://a/b"},
    "runtime": {"image": "evil.example/miner:1"},
    "resources": {"gpus": 1, "gpuResourceName": "example.com/fpga"},
    "scheduling": {
        "priorityClassName": "system-node-critical",
        "runtimeClassName": "kata",
        "tolerations": [{"operator": "Exists"}],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]}
                    ]
                },
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 1, "preference": {"matchExpressions": [{"key": "dedicated", "operator": "Exists"}]}}
                ],
            }
        },
    },
}
SHIPPED = {  # manifests/policy.yaml's ConfigMap, as a cluster admin would start from
    "allowedImagePrefixes": "ghcr.io/kubellm/, registry.example.com/",
    "allowedPriorityClasses": "",
    "allowedRuntimeClasses": "nvidia",
    "allowedTolerationKeys": "nvidia.com/gpu",
    "allowedNodeSelectorKeys": "nvidia.com/gpu.product",
    "allowedGpuResourceNames": "nvidia.com/gpu,amd.com/gpu",
}


def test_the_allow_list_names_every_violation():
    policy = policy_from_configmap(SHIPPED, "ConfigMap kubellm-system/kubellm-policy")
    assert policy.image_prefixes == ("ghcr.io/kubellm/", "registry.example.com/") and policy.priority_classes == ()
    with pytest.raises(Refused) as e:
        admit(parse_spec(HOSTILE), policy)
    assert e.value.reason == "PolicyViolation"
    for what in (
        "evil.example/miner:1",
        "system-node-critical",
        "kata",
        "toleration of key None",
        "node-role.kubernetes.io/control-plane",
        "scheduling.affinity node key 'metadata.name'",
        "scheduling.affinity node key 'dedicated'",
        "example.com/fpga",
        "kubellm-system/kubellm-policy",
    ):
        assert what in e.value.message, what
    fine = {
        "model": {"uri": "hf://a/b"},
        "runtime": {"image": "registry.example.com/kubellm:2"},
        "scheduling": {
            "runtimeClassName": "nvidia",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "Exists"}]}
                        ]
                    }
                },
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
            },
        },
    }
    admit(parse_spec(fine), policy)
    admit(parse_spec(HOSTILE | {"runtime": {}}), Policy())  # no ConfigMap: nothing restricted
    admit(parse_spec({"model": {"uri": "hf://a/b"}}), policy)  # the operator's own image is always allowed


def test_importing_the_operator_leaves_torch_out():
    code = (
        "import sys, kubellm.operator, kubellm.operator.handlers, kubellm.operator.crd, kubellm.operator.policy\n"
        "kubellm.operator.policy.check_extra_args(['--seed', '1'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'kubellm.runtime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_log_lines_are_json_with_the_inferenceservice():
    fmt = JsonFormatter()
    ours = logging.LogRecord("kubellm.operator", logging.INFO, __file__, 1, "applied %s", ("Deployment",), None)
    ours.isvc = "team-a/chat"
    kopfs = logging.LogRecord("kopf.objects", logging.ERROR, __file__, 1, 'said "%s"\n', ("x",), None)
    kopfs.k8s_ref = {"kind": "InferenceService", "namespace": "team-b", "name": "llm", "uid": "u"}
    try:
        raise ValueError("boom")
    except ValueError:
        kopfs.exc_info = sys.exc_info()
    a, b = json.loads(fmt.format(ours)), json.loads(fmt.format(kopfs))
    assert (a["namespace"], a["name"], a["msg"], a["level"]) == ("team-a", "chat", "applied Deployment", "INFO")
    assert (b["namespace"], b["name"], b["msg"]) == ("team-b", "llm", 'said "x"\n') and "boom" in b["exc"]
    assert "\n" not in fmt.format(kopfs)


def test_the_shipped_admission_policy_is_generated_from_its_configmap():
    """One source for both enforcers: the VAP's compiled-in lists are the ConfigMap's, as the operator parses it."""
    path = ROOT / "manifests/policy.yaml"
    text = path.read_text()
    cm = configmap_of(text)
    assert policy_yaml(cm) == text, "run `python -m kubellm.operator.admission_policy manifests/policy.yaml`"
    assert cm["metadata"]["name"] == "kubellm-policy"
    vap = admission_policy(cm["data"])[0]
    compiled = {v["name"]: json.loads(v["expression"]) for v in vap["spec"]["variables"]}
    operator = policy_from_configmap(cm["data"])
    assert compiled == {k: list(getattr(operator, attr)) for k, attr in POLICY_KEYS.items()}
    assert len(vap["spec"]["validations"]) == len(CHECKS) == len(POLICY_KEYS) + 1  # nodeSelector and affinity
    assert "paramKind" not in vap["spec"]  # kubernetes/kubernetes#130887
    # an absent key is no check at all; a present but empty one allows nothing
    assert [v["name"] for v in admission_policy({"allowedPriorityClasses": ""})[0]["spec"]["variables"]] == [
        "allowedPriorityClasses"
    ]
