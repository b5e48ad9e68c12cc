"""The operator's kopf peering priority: replicas of one Deployment share their arguments, so each computes its
own; the oldest must keep acting when a newer one (a replacement, a rollout's pod) joins."""

from __future__ import annotations

import time

from kubellm.operator.main import seniority_priority


def test_a_replica_started_later_has_a_lower_priority():
    earlier = seniority_priority()
    time.sleep(0.002)
    later = seniority_priority()
    assert later < earlier


def test_a_hand_run_operator_pauses_the_deployed_ones():
    # kopf's default priority is 0 (`kopf run` / `kubellm operator --priority N` on a developer's machine)
    assert seniority_priority() < 0
