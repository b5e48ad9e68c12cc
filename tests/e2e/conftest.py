"""A shared `kubellm serve` (API keys from a file) for the HTTP tests."""

from __future__ import annotations

import pytest

from tests.support.server import KEY, ServerProcess


@pytest.fixture(scope="session")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secrets") / "api-keys"
    path.write_text(f"# mounted Secret\n{KEY}\n")
    return path


@pytest.fixture(scope="session")
def server(tiny_model, key_file):
    s = ServerProcess(
        tiny_model,
        "--api-key-file",
        str(key_file),
        "--max-model-len",
        "256",
        "--max-body-bytes",
        "65536",
        "--served-model-name",
        "tiny",
        "--allowed-origins",
        "https://ui.example",
    )
    try:
        yield s.wait_ready()
    finally:
        s.stop()
