"""Packaging and install manifests, checked without a cluster (the `node` tier checks the built images):
the operator's install pulls no engine dependencies, and its Deployment can run with a read-only root."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "triton", "nvidia-", "tokenizers", "safetensors", "accelerate", "gguf")


def name_of(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def resolved(extras: str) -> list[str]:
    """What `pip install .[extras]` asks for, read from pyproject.toml: base dependencies plus the extras, with
    the package's references to its own extras (kubellm[engine]) followed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out, todo, seen = list(project.get("dependencies", [])), extras.split(","), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            if name_of(req) == project["name"]:
                todo += req[req.index("[") + 1 : req.index("]")].split(",")
            else:
                out.append(req)
    return sorted(set(out))


def requirements(extras: str) -> list[str]:
    """install.sh's list (the images' dependency layer) for the extras: the same as pip's."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/install.sh"), "--requirements", extras], check=True, capture_output=True, text=True
    ).stdout
    assert out.split("\n")[:-1] == resolved(extras)
    return [name_of(line) for line in out.split()]


def test_operator_extra_installs_no_engine_dependencies():
    """6.3 GB operator image: `.[operator]` installed torch, the CUDA wheels and transformers (base deps)."""
    names = [name_of(r) for r in resolved(image_extras("Dockerfile.operator"))]
    assert "kopf" in names and "kubernetes" in names
    assert not [n for n in names if n.startswith(HEAVY)], names


def test_install_script_lists_what_pip_resolves():
    for extras in ("operator", "server", "test", "operator,otel", "server,otel"):
        requirements(extras)


def image_extras(dockerfile: str) -> str:
    """The extras an image's dependency layer installs (its `install.sh PYTHON EXTRAS deps FILE` line)."""
    (extras,) = re.findall(r"install\.sh \S+ (\S+) deps requirements\.txt", (ROOT / dockerfile).read_text())
    return extras


def test_image_requirement_files_are_in_sync():
    """The images install their dependency layer from these files (so that only a dependency change rebuilds it)."""
    for extra, dockerfile in (("operator", "Dockerfile.operator"), ("server", "Dockerfile.runtime")):
        extras = image_extras(dockerfile)
        assert extras.split(",")[0] == extra and "otel" in extras.split(","), extras  # both images can trace
        path = ROOT / "requirements" / f"{extra}.txt"
        name = path.relative_to(ROOT)
        assert path.read_text().split() == resolved(extras), (
            f"{name} is out of date: scripts/install.sh --requirements {extras} > {name}"
        )


def test_server_and_test_extras_still_get_the_engine():
    for extras in ("server", "test", "demo", "engine"):
        assert {"torch", "transformers", "safetensors", "tokenizers"} <= {name_of(r) for r in resolved(extras)}


def test_operator_imports_without_engine_modules():
    code = (
        "import sys, kubellm.cli, kubellm.operator.main, kubellm.operator.handlers\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'triton', 'numpy'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_operator_deployment_has_a_writable_tmp():
    """The kubernetes client's discovery cache needs a temp dir; readOnlyRootFilesystem without a /tmp volume
    crash-looped the operator in-cluster (found on a real node)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/operator.yaml").read_text()) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert "/tmp" in mounts, "no writable /tmp under a read-only root filesystem"
    vol = {v["name"]: v for v in pod.get("volumes", [])}[mounts["/tmp"]]
    assert vol["emptyDir"].get("sizeLimit"), "an emptyDir without sizeLimit can fill the node's disk"
