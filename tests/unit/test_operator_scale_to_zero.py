"""Scale to zero in the operator's status: an InferenceService with minReplicas 0 whose Deployment the router
scaled to 0 says so (WorkloadReady/Ready reason ScaledToZero, status.scaledToZero, a printer column), and one
merely without pods does not."""

from __future__ import annotations

from kubellm.operator.crd import build_crd
from kubellm.operator.status import compute_status


def isvc(min_replicas: int) -> dict:
    spec = {"model": {"uri": "hf://a/b"}, "autoscaling": {"minReplicas": min_replicas, "idleSeconds": 120}}
    return {"metadata": {"name": "m", "namespace": "ns", "generation": 3}, "spec": spec}


def deployment(replicas: int) -> dict:
    return {"spec": {"replicas": replicas}, "status": {"replicas": 0}}


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


HPA_AT_ZERO = {"status": {"conditions": [{"type": "ScalingActive", "status": "False", "reason": "ScalingDisabled"}]}}


def test_a_service_scaled_to_zero_says_so():
    status = compute_status(isvc(0), deployment(0), HPA_AT_ZERO, [])
    c = conditions(status)
    assert status["scaledToZero"] is True
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "ScaledToZero")
    assert "120 s" in c["WorkloadReady"]["message"]
    assert (c["AutoscalerReady"]["status"], c["AutoscalerReady"]["reason"]) == ("True", "ScaledToZero")


def test_no_pods_is_not_scaled_to_zero_unless_the_service_scales_to_zero_and_the_deployment_is_at_zero():
    for spec_min, replicas in ((1, 0), (0, 1)):
        status = compute_status(isvc(spec_min), deployment(replicas), HPA_AT_ZERO, [])
        assert status["scaledToZero"] is False
        assert conditions(status)["Ready"]["reason"] != "ScaledToZero"


def test_kubectl_get_shows_the_column():
    columns = build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {"name": "ScaledToZero", "type": "boolean", "jsonPath": ".status.scaledToZero"} in columns
