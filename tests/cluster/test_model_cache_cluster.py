"""model.cache on a real control plane (KWOK runs the pods; its Job pods complete at once): the claim and the
Job are created, the replicas wait while the claim is unbound (status says so), the Job completes once the claim
binds and the replicas become Ready; the Job is not replaced while nothing changed; deletion removes the claim
(reclaim Delete) or keeps it for the next InferenceService of that name (Retain); pvc:// with a cache is refused."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubellm.operator.render import cache_subdir
from tests.support.isvc import G, P, V, condition, create_isvc, custom, get_isvc, wait_ready
from tests.support.kube import wait_for

pytestmark = pytest.mark.cluster
URI = "s3://models/tiny"


def spec(reclaim: str = "Delete") -> dict:
    return {
        "model": {
            "uri": URI,
            "credentialsSecret": "s3-creds",
            "cache": {"enabled": True, "size": "1Gi", "storageClassName": "", "reclaim": reclaim},
        },
        "resources": {"gpus": 0},
        "autoscaling": {"enabled": False},
        "replicas": 2,
    }


def bind_volume(ns: str, claim: str) -> None:
    """A PersistentVolume made for the claim (no provisioner here), as an admin would for storageClassName ""."""
    client.CoreV1Api().create_persistent_volume(
        {
            "metadata": {"name": f"{ns}-{claim}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": f"/tmp/{ns}-{claim}"},
                "claimRef": {"namespace": ns, "name": claim},
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
            },
        }
    )


def claim_or_none(ns: str, name: str):
    try:
        return client.CoreV1Api().read_namespaced_persistent_volume_claim(name, ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_replicas_wait_for_the_cache_job_then_serve_from_the_claim(operator, namespace):
    create_isvc(namespace, "cached", spec())
    pending = wait_for(
        "status: the cache claim is pending",
        lambda: (o := get_isvc(namespace, "cached")) and condition(o).get("reason") == "ModelCachePending" and o,
        timeout=60,
    )
    assert pending["status"]["cache"]["phase"] == "Pending" and "not bound" in pending["status"]["cache"]["message"]
    pvc = claim_or_none(namespace, "cached")
    assert pvc.spec.access_modes == ["ReadWriteMany"] and pvc.spec.resources.requests["storage"] == "1Gi"
    job = client.BatchV1Api().read_namespaced_job("cached", namespace)
    model_dir = f"/models/{cache_subdir(URI)}"
    assert job.spec.template.spec.containers[0].command[:4] == ["kubellm", "fetch-model", URI, model_dir]
    dep = client.AppsV1Api().read_namespaced_deployment("cached", namespace)
    assert dep.spec.template.spec.init_containers[0].command == ["kubellm", "wait-for-model", URI, model_dir]
    assert dep.spec.template.spec.volumes[0].persistent_volume_claim.read_only is True
    assert not client.AppsV1Api().read_namespaced_deployment("cached", namespace).status.ready_replicas

    bind_volume(namespace, "cached")
    wait_ready(namespace, "cached", timeout=120)  # KWOK's replicas need not wait: it fakes their init containers
    wait_for(
        "status: the cache is Ready",
        lambda: get_isvc(namespace, "cached")["status"].get("cache", {}).get("phase") == "Ready",
        timeout=60,
    )
    assert client.BatchV1Api().read_namespaced_job("cached", namespace).status.succeeded == 1
    wait_for(
        "both replicas Ready in status",
        lambda: (
            [r["phase"] for r in get_isvc(namespace, "cached")["status"].get("replicaStatuses", [])]
            == ["Ready", "Ready"]
        ),
        timeout=60,
    )
    assert get_isvc(namespace, "cached")["status"]["progress"] == "2/2 ready"
    # a reconcile with nothing changed leaves the completed Job alone (no second download)
    uid = client.BatchV1Api().read_namespaced_job("cached", namespace).metadata.uid
    patch = {"metadata": {"labels": {"touched": "yes"}}, "spec": {"replicas": 1}}
    custom().patch_namespaced_custom_object(G, V, namespace, P, "cached", patch)
    wait_for(
        "the scale-down reconciled",
        lambda: client.AppsV1Api().read_namespaced_deployment("cached", namespace).spec.replicas == 1,
        timeout=60,
    )
    assert client.BatchV1Api().read_namespaced_job("cached", namespace).metadata.uid == uid

    custom().delete_namespaced_custom_object(G, V, namespace, P, "cached")
    wait_for(
        "the cache claim deleted with it (reclaim Delete)",
        lambda: claim_or_none(namespace, "cached") is None,
        timeout=120,
    )


def test_a_retained_cache_is_taken_up_by_the_next_service_of_that_name(operator, namespace):
    create_isvc(namespace, "kept", spec(reclaim="Retain"))
    bind_volume(namespace, "kept")
    wait_ready(namespace, "kept", timeout=120)
    first_claim = claim_or_none(namespace, "kept")
    assert not first_claim.metadata.owner_references
    custom().delete_namespaced_custom_object(G, V, namespace, P, "kept")
    wait_for(
        "the InferenceService and its Deployment gone",
        lambda: (
            not custom().list_namespaced_custom_object(G, V, namespace, P)["items"]
            and not client.AppsV1Api().list_namespaced_deployment(namespace).items
        ),
        timeout=120,
    )
    assert claim_or_none(namespace, "kept").metadata.uid == first_claim.metadata.uid
    create_isvc(namespace, "kept", spec(reclaim="Retain"))
    wait_ready(namespace, "kept", timeout=120)
    wait_for(
        "status: the cache is Ready",
        lambda: get_isvc(namespace, "kept")["status"].get("cache", {}).get("phase") == "Ready",
        timeout=60,
    )
    assert claim_or_none(namespace, "kept").metadata.uid == first_claim.metadata.uid  # the same volume, not a new one


def test_a_cache_for_a_pvc_model_is_refused(crd_installed, namespace):
    with pytest.raises(ApiException) as err:
        create_isvc(namespace, "bad", {"model": {"uri": "pvc://models/x", "cache": {"enabled": True}}})
    assert err.value.status == 422
    assert "model.cache is for hf:// and s3:// models" in json.loads(err.value.body)["message"]
