"""The router's view of LoRA adapters (pure): what a pod's /v1/models says it holds (or, for a pod that checks API
keys, what the operator's status reports), and each adapter's route narrowed to the pods that hold it."""

from __future__ import annotations

from kubellm.router.discovery import Route, adapter_routes, held_adapters, isvc_route
from kubellm.router.scrape import parse_adapters

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


def test_parse_adapters_reads_vllms_model_list():
    doc = {
        "object": "list",
        "data": [
            {"id": "base", "object": "model", "root": "/models/base", "parent": None},
            {"id": "sql", "object": "model", "root": "/models/sql", "parent": "base"},
        ],
    }
    assert parse_adapters(doc) == {"sql": "base"}
    assert parse_adapters({"error": {"message": "bad key"}}) == {} and parse_adapters([1, 2]) == {}


def test_an_adapter_routes_only_to_the_pods_that_hold_it():
    routes = {
        "base": Route(
            "base", (A, B), pods=((A, "ns", "p-a"), (B, "ns", "p-b")), scale_target=("ns", "base"), idle_seconds=60
        ),
        "other": Route("other", (C,)),
    }
    held = {A: {"sql": "base", "fr": "base"}, B: {"fr": "base"}, C: {"other-ad": "other"}}
    got = adapter_routes(routes, held)
    assert set(got) == {"sql", "fr", "other-ad"}
    assert got["sql"].endpoints == (A,) and got["sql"].pods == ((A, "ns", "p-a"),) and got["sql"].parent == "base"
    assert got["fr"].endpoints == (A, B)
    assert got["other-ad"].endpoints == (C,) and got["other-ad"].parent == "other"
    assert not got["sql"].scales_to_zero  # the model scales; its adapter only follows it


def test_a_pod_whose_adapter_names_another_parent_or_a_model_is_ignored():
    routes = {"base": Route("base", (A,)), "sql": Route("sql", (B,))}
    held = {A: {"sql": "base", "x": "not-base"}, C: {"y": "base"}}  # C is not a Ready endpoint of base
    assert adapter_routes(routes, held) == {}


def test_an_inference_service_route_carries_its_declared_adapters():
    obj = {
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": {"uri": "pvc://m/base"}, "adapters": [{"name": "sql", "uri": "pvc://m/sql"}]},
    }
    assert isvc_route(obj, [A]).adapters == ("sql",)
    assert isvc_route({"metadata": {"name": "x", "namespace": "ns"}, "spec": {}}, []).adapters == ()


def test_a_pod_that_will_not_list_its_models_is_read_from_the_operators_status():
    """With server.apiKeySecret the pods answer /v1/models with a 401 to the router (it holds no key): the
    scraper records None, and status.replicaAdapters (pod name → adapters, mapped to URLs by the endpoints'
    pod references) says what such a pod holds; a pod that did answer is believed over the status."""
    obj = {
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": {"uri": "pvc://m/base"}, "adapters": [{"name": "sql", "uri": "pvc://m/sql"}]},
        "status": {"replicaAdapters": [{"pod": "p-a", "adapters": ["sql"]}, {"pod": "p-b", "adapters": ["sql"]}]},
    }
    route = isvc_route(obj, [A, B, C], ((A, "ns", "p-a"), (B, "ns", "p-b"), (C, "ns", "p-c")))
    assert route.reported_adapters == ((A, ("sql",)), (B, ("sql",)))
    routes = {"chat": route}
    scraped = {A: None, B: {}, C: None}  # A and C refused; B answered that it holds nothing (yet)
    assert held_adapters(routes, scraped) == {A: {"sql": "chat"}, B: {}}
    assert adapter_routes(routes, held_adapters(routes, scraped))["sql"].endpoints == (A,)
    assert held_adapters(routes, {}) == {}  # a pod not scraped yet: nothing from the status either
