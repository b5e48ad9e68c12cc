"""InferenceService objects on the test cluster's API: create, read, and wait for the Ready condition."""

from __future__ import annotations

from kubernetes import client

from tests.support.wait import wait_until

G, V, P = "kubellm.io", "v1alpha1", "inferenceservices"


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi()


def get_isvc(ns: str, name: str) -> dict:
    return custom().get_namespaced_custom_object(G, V, ns, P, name)


def create_isvc(ns: str, name: str, spec: dict) -> dict:
    body = {"apiVersion": f"{G}/{V}", "kind": "InferenceService", "metadata": {"name": name}, "spec": spec}
    return custom().create_namespaced_custom_object(G, V, ns, P, body)


def condition(obj: dict, kind: str = "Ready") -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def wait_ready(ns: str, name: str, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (o := get_isvc(ns, name)) and condition(o).get("status") == "True" and o,
        timeout=timeout,
        what=f"{name} Ready",
    )
