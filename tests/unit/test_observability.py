"""The shipped observability: the Grafana dashboard and the alert rules (manifests/monitoring/, copied into the
chart) name only metrics that kubellm exports, every PromQL expression parses (promtool, built from its Go
module: tests/support/build-promtool.sh), and each alert fires on a synthetic series (`promtool test rules`)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubellm.router.metrics import RouterMetrics
from kubellm.runtime.engine.wire import EngineInfo, EngineSnapshot
from kubellm.runtime.server.metrics import ServerMetrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "manifests/monitoring/grafana-dashboard.json"
RULES = ROOT / "manifests/monitoring/prometheus-rules.yaml"
NAME = re.compile(r"\b(vllm:[a-z0-9_:]+|kubellm_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


def exported() -> set[str]:
    """Every series name the runtime's /metrics and the router's /metrics can carry."""
    engine = SimpleNamespace(
        # a GPU's snapshot: the GPU memory gauges exist only there
        snapshot=EngineSnapshot(
            kv_cache_bytes=1 << 20, device_memory_used_bytes=3 << 30, device_memory_total_bytes=8 << 30
        ),
        num_waiting=0,
        info=EngineInfo(max_model_len=16, vocab_size=8, num_gpu_blocks=4, device="cuda:0"),
        config=SimpleNamespace(block_size=16, enable_lora=False, kv_cache_dtype="auto"),
    )
    names = set()
    for registry in (ServerMetrics(engine, "m").registry, RouterMetrics().registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rule_groups() for r in g["rules"]]


def test_the_chart_ships_the_same_files():
    for path in (DASHBOARD, RULES):
        assert (ROOT / "charts/kubellm/files" / path.name).read_text() == path.read_text(), path.name


def test_dashboard_and_alerts_name_only_metrics_we_export():
    have = exported()
    used = {n for e in dashboard_exprs() + rule_exprs() for n in NAME.findall(e)}
    assert used and not used - have, sorted(used - have)
    # and the check can fail: a name we do not export is caught
    assert "vllm:num_requests_swapped" not in have


@pytest.fixture(scope="module")
def promtool() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "tests/support/build-promtool.sh")], check=True, capture_output=True, text=True
    ).stdout
    return out.split()[-1]


def check_rules(promtool: str, groups: list[dict], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)


def test_every_expression_parses(promtool, tmp_path):
    p = check_rules(promtool, rule_groups(), tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    as_recording = [{"record": f"kubellm:dashboard_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]
    p = check_rules(promtool, [{"name": "dashboard", "rules": as_recording}], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    broken = [{"record": "kubellm:broken", "expr": "sum by (model (vllm:num_requests_waiting)"}]
    assert check_rules(promtool, [{"name": "broken", "rules": broken}], tmp_path).returncode != 0


def alert(name: str, labels: dict, summary: str, eval_time: str) -> dict:
    rule = next(r for g in rule_groups() for r in g["rules"] if r["alert"] == name)
    expected = {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {**rule["annotations"], "summary": summary},
    }
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": [expected]}


def test_each_alert_fires_on_a_synthetic_series(promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    m = {"namespace": "ml", "model_name": "m"}
    firing = {
        "interval": "1m",
        "input_series": [
            {"series": 'vllm:num_requests_waiting{namespace="ml",model_name="m",pod="a"}', "values": "0+1x40"},
            {"series": 'vllm:kv_cache_usage_perc{namespace="ml",model_name="m",pod="a"}', "values": "0.97+0x40"},
            {"series": 'kubellm_router_requests_total{model="r",code="500"}', "values": "0+6x40"},
            {"series": 'kubellm_router_requests_total{model="r",code="200"}', "values": "0+54x40"},
            {"series": 'kubellm_router_desired_replicas{model="r"}', "values": "3x40"},
            {"series": 'kubellm_router_endpoints{model="r"}', "values": "1x40"},
            {"series": 'kubellm_router_held_requests{model="r"}', "values": "2x40"},
        ],
        "alert_rule_test": [
            alert("KubellmQueueGrowing", m, "m: 25 requests waiting and the queue still grows", "25m"),
            alert("KubellmKVCacheFull", m, "m: KV cache 97% full", "25m"),
            alert("KubellmErrorRate", {"model": "r"}, "r: 10% of requests through the router fail", "25m"),
            alert(
                "KubellmReplicasNotReady", {"model": "r"}, "r: 3 replicas asked for, fewer Ready for 15 minutes", "25m"
            ),
            alert(
                "KubellmRequestsHeldAtZero",
                {"model": "r"},
                "r: requests held for 10 minutes waiting for the first Ready pod",
                "25m",
            ),
        ],
    }
    quiet = {  # a long but steady queue, a half-full cache, no errors, all Ready, nothing held: no alert
        "interval": "1m",
        "input_series": [
            {"series": 'vllm:num_requests_waiting{namespace="ml",model_name="m",pod="a"}', "values": "20x40"},
            {"series": 'vllm:kv_cache_usage_perc{namespace="ml",model_name="m",pod="a"}', "values": "0.5x40"},
            {"series": 'kubellm_router_requests_total{model="r",code="200"}', "values": "0+60x40"},
            {"series": 'kubellm_router_desired_replicas{model="r"}', "values": "3x40"},
            {"series": 'kubellm_router_endpoints{model="r"}', "values": "3x40"},
            {"series": 'kubellm_router_held_requests{model="r"}', "values": "0x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": a, "exp_alerts": []}
            for a in (
                "KubellmQueueGrowing",
                "KubellmKVCacheFull",
                "KubellmErrorRate",
                "KubellmReplicasNotReady",
                "KubellmRequestsHeldAtZero",
            )
        ],
    }
    test = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [firing, quiet]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    p = subprocess.run([promtool, "test", "rules", str(tmp_path / "test.yaml")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
