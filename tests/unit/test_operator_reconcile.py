"""The Reconciler against an in-memory API: it never adopts a stranger's object, writes with the uid it
expects, deletes only what it owns, and refuses a spec its checks refuse before touching anything."""

from __future__ import annotations

import pytest

from kubellm.operator.policy import Refused
from tests.support.recording_api import recording_reconciler

ISVC = {"metadata": {"name": "shop", "namespace": "ns", "uid": "u1"}, "spec": {"model": {"uri": "hf://a/b"}}}
STRANGER = {"metadata": {"name": "shop", "namespace": "ns", "uid": "s1"}, "spec": {"selector": {"app": "shop"}}}


def test_a_child_name_held_by_a_stranger_is_a_conflict_and_nothing_is_written():
    r, api = recording_reconciler()
    api.isvc = ISVC
    api.store[("Service", "ns", "shop")] = STRANGER
    with pytest.raises(Refused) as e:
        r.reconcile(ISVC)
    assert e.value.reason == "ChildConflict" and "Service ns/shop already exists" in e.value.message
    assert api.store[("Service", "ns", "shop")] is STRANGER
    assert {verb for _, verb in api.calls} == {"get"}  # read only: not even the Deployment was applied
    with pytest.raises(Refused):
        r.repair(ISVC, "Service")
    assert r.delete_children(ISVC) == [] and api.store[("Service", "ns", "shop")] is STRANGER


def test_writes_carry_the_expected_uid():
    r, api = recording_reconciler()
    api.isvc = ISVC
    r.reconcile(ISVC)
    created = api.store[("Deployment", "ns", "shop")]
    assert created["metadata"]["uid"] == "uid-Deployment"  # the fake assigns one on create, as the API does
    # created, then handed to our apply manager (so that a field no longer applied is removed)
    assert created["metadata"]["managedFields"] == [{"manager": "kubellm-operator", "operation": "Apply"}]
    r.reconcile(ISVC)  # an update names the live object's uid: a replaced object fails the write
    assert api.store[("Deployment", "ns", "shop")]["metadata"]["uid"] == "uid-Deployment"
    assert set(r.delete_children(ISVC)) == {"Deployment", "Service", "HorizontalPodAutoscaler"}


def test_a_refused_spec_touches_nothing():
    r, api = recording_reconciler()
    api.policy_data = {"allowedPriorityClasses": ""}
    spec = {**ISVC["spec"], "scheduling": {"priorityClassName": "system-node-critical"}}
    with pytest.raises(Refused) as e:
        r.reconcile({**ISVC, "spec": spec})
    assert e.value.reason == "PolicyViolation" and not api.store
