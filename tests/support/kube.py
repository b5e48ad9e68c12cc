"""Small helpers for cluster tests: wait for a condition on the real API."""

from __future__ import annotations

from tests.support.wait import wait_until


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.3):
    """Poll fn until it returns something truthy (the cluster tests' spelling of wait_until, what first)."""
    return wait_until(fn, timeout=timeout, interval=interval, what=what)


def make_pvc(ns: str, claim: str) -> None:
    """A PersistentVolumeClaim bound to a hostPath PV of its own (KWOK pods never read it)."""
    from kubernetes import client

    pv_name = f"{ns}-{claim}"
    client.CoreV1Api().create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadOnlyMany"],
                "hostPath": {"path": "/models"},
                "claimRef": {"namespace": ns, "name": claim},
                "persistentVolumeReclaimPolicy": "Retain",
            },
        }
    )
    client.CoreV1Api().create_namespaced_persistent_volume_claim(
        ns,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )
