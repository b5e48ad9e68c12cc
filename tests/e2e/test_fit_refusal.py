"""`kubellm serve` refuses a model that does not fit (kubellm/fit.py) at start: a distinct exit code, the
reason with its numbers in the termination-message file Kubernetes reads and in the log."""

from __future__ import annotations

from kubellm import fit
from kubellm.downloads import last_startup_phase
from tests.support.server import ServerProcess


def test_serve_exits_with_the_fit_code_and_a_termination_message(tiny_model, tmp_path, monkeypatch):
    message_file = tmp_path / "termination-log"
    monkeypatch.setenv("KUBELLM_TERMINATION_MESSAGE_PATH", str(message_file))
    s = ServerProcess(tiny_model, "--device-memory-bytes", "100000")
    try:
        code = s.proc.wait(timeout=120)
    finally:
        s.stop()
    assert code == fit.EXIT_CODE, s.logs()[-2000:]
    refusal = fit.parse_termination_message(message_file.read_text())
    assert refusal is not None, message_file.read_text()
    assert refusal["device_memory_bytes"] == 100000 and refusal["needed_bytes"] > refusal["usable_bytes"]
    assert "the model does not fit: weights" in refusal["message"]
    assert '"event": "start_refused"' in s.logs()
    assert last_startup_phase(s.logs()) is None  # refused before any weight was read
