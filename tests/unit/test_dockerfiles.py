"""hadolint-style checks on the Dockerfiles (no Docker engine here), and that they install the package with
the same script CI runs (`make setup` → scripts/install.sh)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.runtime", "Dockerfile.operator"]


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_follows_the_rules(name):
    ins = instructions(ROOT / name)
    ops = [op for op, _ in ins]
    froms = [arg for op, arg in ins if op == "FROM"]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), "DL3006/DL3007: pin base images"
    assert "ADD" not in ops, "DL3020: use COPY"
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "DL3002: the last USER must not be root"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), "run as non-root after installing"
    for op, arg in ins:
        if op == "WORKDIR":
            assert arg.startswith("/"), "DL3000: absolute WORKDIR"
        if op in ("ENTRYPOINT", "CMD"):
            assert arg.startswith("["), "DL3025: exec form"
        if op == "RUN":
            assert "sudo" not in arg, "DL3004"
            assert "cd " not in arg, "DL3003: use WORKDIR"
            if "apt-get install" in arg:
                assert "--no-install-recommends" in arg and "rm -rf /var/lib/apt/lists" in arg, "DL3015/DL3009"
            if re.search(r"pip3? install", arg):
                assert "--no-cache-dir" in arg, "DL3042"


@pytest.mark.parametrize("name,extra", [("Dockerfile.runtime", "server"), ("Dockerfile.operator", "operator")])
def test_images_install_with_the_ci_script(name, extra):
    runs = [arg for op, arg in instructions(ROOT / name) if op == "RUN"]
    assert any(f"scripts/install.sh /usr/local/bin/python {extra}" in r for r in runs)
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text()
    for copied in [arg.split()[0] for op, arg in instructions(ROOT / name) if op == "COPY"]:
        assert copied.startswith("--from=") or (ROOT / copied).exists(), f"COPY {copied}: no such path"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependency_layer_comes_before_the_code(name):
    """A one-line code change must not reinstall torch: the dependencies are installed from a list made in
    its own stage (so editing unrelated parts of pyproject.toml keeps that layer too), then the code."""
    ins = instructions(ROOT / name)
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    deps = next(i for i, (op, arg) in enumerate(final) if op == "RUN" and " deps " in f"{arg} ")
    code = next(i for i, (op, arg) in enumerate(final) if op == "COPY" and arg.split()[0] == "kubellm")
    assert deps < code
    assert not any(op == "COPY" and arg.split()[0] == "pyproject.toml" for op, arg in final[:deps])
    assert any(op == "RUN" and arg.endswith(" nodeps") for op, arg in final[code:])
