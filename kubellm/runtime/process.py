"""Process helpers shared by the server, the engine-core process and tensor-parallel workers."""

from __future__ import annotations

import os
import socket
import sys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def exit_process(code: int) -> None:
    """End a finished process (server, engine, tensor-parallel rank) without interpreter teardown: there,
    Triton's bindings print pages of bogus nanobind "leak" reports into the pod's JSON logs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
