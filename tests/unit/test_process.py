"""kubellm/runtime/process.py: the free ports that tests and tensor-parallel ranks bind a moment later."""

import collections
import socket

from kubellm.runtime import process


def test_free_ports_are_distinct_bindable_and_never_ones_the_kernel_gives_outgoing_connections():
    ports = [process.free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    assert all(15000 <= p < min(30000, process._ephemeral_range_start()) for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_a_port_someone_listens_on_is_not_handed_out(monkeypatch):
    listening = socket.socket()
    listening.bind(("127.0.0.1", process.free_port()))
    listening.listen()
    taken, other = listening.getsockname()[1], process.free_port()
    draws = iter([taken, other])

    class Draws:
        def randrange(self, low, high):
            return next(draws)

    monkeypatch.setattr(process.random, "SystemRandom", Draws)
    monkeypatch.setattr(process, "_recent_ports", collections.deque())  # both were handed out above
    try:
        assert process.free_port() == other
    finally:
        listening.close()
