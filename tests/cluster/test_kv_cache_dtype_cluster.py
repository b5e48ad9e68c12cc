"""runtime.kvCacheDtype on a real control plane: the API server refuses a value the engine does not know (the
CRD's enum, from the pydantic model) and extraArgs cannot set the flag; the operator renders
`--kv-cache-dtype` into the Deployment, and a change of the field rolls the pod template."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.isvc import G, P, V, create_isvc, custom
from tests.support.kube import wait_for

pytestmark = pytest.mark.cluster
BASE = {"model": {"uri": "hf://org/base"}, "resources": {"gpus": 0}, "autoscaling": {"enabled": False}}


@pytest.mark.parametrize(
    "runtime, message",
    [
        ({"kvCacheDtype": "int8"}, 'Unsupported value: "int8"'),
        ({"extraArgs": ["--kv-cache-dtype", "fp8"]}, "any other setting the operator owns"),
    ],
)
def test_bad_kv_cache_dtype_is_refused_by_the_api(crd_installed, namespace, runtime, message):
    with pytest.raises(ApiException) as err:
        create_isvc(namespace, "bad", {**BASE, "runtime": runtime})
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def _kv_flag(ns: str, name: str) -> str | None:
    try:
        args = client.AppsV1Api().read_namespaced_deployment(name, ns).spec.template.spec.containers[0].args
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return args[args.index("--kv-cache-dtype") + 1] if "--kv-cache-dtype" in args else "auto"


def test_the_deployment_gets_the_kv_cache_dtype_flag(operator, namespace):
    create_isvc(namespace, "fp8kv", {**BASE, "runtime": {"kvCacheDtype": "fp8"}})
    wait_for("--kv-cache-dtype fp8", lambda: _kv_flag(namespace, "fp8kv") == "fp8")
    patch = {"spec": {"runtime": {"kvCacheDtype": "auto"}}}  # the live object changes: the operator follows
    custom().patch_namespaced_custom_object(G, V, namespace, P, "fp8kv", patch)
    wait_for("no --kv-cache-dtype", lambda: _kv_flag(namespace, "fp8kv") == "auto")
