"""kube-score (built from its Go module, cached by version) over the rendered objects of every example and of a
hostile CR: nothing above OK except the checks in kube-score-skips.yaml, each skipped for a stated reason."""

from __future__ import annotations

import pathlib
import subprocess

import pytest
import yaml

from kubellm.operator.render import render
from tests.support.rendered import scanned_specs

ROOT = pathlib.Path(__file__).resolve().parents[2]
SKIPS = yaml.safe_load((pathlib.Path(__file__).with_name("kube-score-skips.yaml")).read_text())


@pytest.fixture(scope="module")
def kube_score() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "tests/support/build-kube-score.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return out.strip().splitlines()[-1]


def rendered(tmp_path) -> pathlib.Path:
    docs = []
    for name, spec in scanned_specs().items():
        docs += render({"metadata": {"name": name, "namespace": "scan", "uid": "u"}, "spec": spec})
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def score(kube_score: str, path: pathlib.Path, ignore: list[str], flags: bool = True) -> list[str]:
    args = [kube_score, "score", "--output-format", "ci", *(SKIPS["flags"] if flags else []), str(path)]
    for check in ignore:
        args += ["--ignore-test", check]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.startswith(("[WARNING]", "[CRITICAL]"))]


def test_rendered_objects_pass_kube_score(kube_score, tmp_path):
    path = rendered(tmp_path)
    findings = score(kube_score, path, list(SKIPS["ignore"]))
    assert not findings, "\n".join(findings)


def test_every_skip_is_still_needed(kube_score, tmp_path):
    """A skip whose check no longer fires is stale: remove it (and each reason stays true)."""
    path = rendered(tmp_path)
    for check in SKIPS["ignore"]:
        others = [c for c in SKIPS["ignore"] if c != check]
        assert score(kube_score, path, others), f"{check} no longer fires: drop it from kube-score-skips.yaml"
    assert score(kube_score, path, list(SKIPS["ignore"]), flags=False), "the flags are no longer needed"
