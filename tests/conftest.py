"""Shared fixtures: tiny random-weight models (one per architecture), built once per session, offline."""

from __future__ import annotations

import os

import pytest

from tests.support.tiny_models import ARCHITECTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from kubellm.weights.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(str(root / arch), arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["llama"]
