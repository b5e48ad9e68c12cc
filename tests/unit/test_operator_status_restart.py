"""A runtime container restarted (its liveness probe failed after the engine process died, found on a real
node) is reported as such while it comes back, not as a replica still starting."""

from __future__ import annotations

import datetime as dt

from kubellm.operator.status import pod_problem

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def pod(ready: bool, restarts: int, last: dict | None) -> dict:
    cs = {"name": "server", "ready": ready, "restartCount": restarts, "state": {"running": {}}}
    if last:
        cs["lastState"] = {"terminated": last}
    return {
        "metadata": {"creationTimestamp": "2026-11-30T11:59:00Z"},
        "status": {
            "startTime": "2026-11-30T11:59:00Z",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [cs],
        },
    }


def test_restarted_container_is_reported_until_ready_again():
    last = {"reason": "Completed", "exitCode": 0, "finishedAt": "2026-11-30T11:59:50Z"}
    reason, message = pod_problem(pod(False, 1, last), "nvidia.com/gpu", 300, NOW)
    assert reason == "Restarted" and "restarts: 1" in message and "Completed" in message
    assert pod_problem(pod(True, 1, last), "nvidia.com/gpu", 300, NOW) is None
    assert pod_problem(pod(False, 0, None), "nvidia.com/gpu", 300, NOW) is None  # first start: still starting


def test_oomkilled_keeps_its_own_reason():
    last = {"reason": "OOMKilled", "exitCode": 137}
    assert pod_problem(pod(False, 2, last), "nvidia.com/gpu", 300, NOW)[0] == "OOMKilled"
