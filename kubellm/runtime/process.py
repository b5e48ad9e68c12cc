"""Process helpers shared by the server, the engine-core process and tensor-parallel workers."""

from __future__ import annotations

import collections
import os
import random
import socket
import sys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the caller binds it soon after).

    Drawn below the kernel's ephemeral range: a port the kernel picked with bind(0) is free only until the
    caller binds it, and meanwhile any outgoing connection on the host may be given it as its source port
    (CI once lost a test to exactly that). Below the range only another explicit bind can take it. The draw
    also stays above the ports Kubernetes components listen on (kubelet 10250, …) and below NodePorts
    (30000-32767). A port handed out recently by this process is not handed out again: callers often take
    several before binding."""
    low, high = 15000, min(30000, _ephemeral_range_start())
    rng = random.SystemRandom()
    for _ in range(200 if high > low else 0):
        port = rng.randrange(low, high)
        if port in _recent_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _recent_ports.append(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_recent_ports: collections.deque[int] = collections.deque(maxlen=256)


def _ephemeral_range_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def exit_process(code: int) -> None:
    """End a finished process (server, engine, tensor-parallel rank) without interpreter teardown: there,
    Triton's bindings print pages of bogus nanobind "leak" reports into the pod's JSON logs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
