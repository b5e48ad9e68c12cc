"""The model cache on a real node: a model in S3 (moto's server on the node's address, behind a proxy that
paces its answers so the download can be watched) → the cache Job fills a local PersistentVolume while the status
says how far it is → replica 1 serves, and the operator has read the model's config from the Job's termination
message (status.modelConfig); scaled to 2, the second replica starts without downloading: no byte leaves
the S3 server after the first download, no second cache pod, its init container found the copy complete. The
times are printed ("[node] cache ...") for bench/RESULTS.md, never asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from kubellm import fit
from kubellm.downloads import LOADING_WEIGHTS, WARMING_UP, last_startup_phase, parse_config_report
from kubellm.operator.render import cache_subdir
from tests.support.node_k8s import P, apply, get, isvc, node_name, pods, ready_pods, service_client, wait_isvc_ready
from tests.support.real_node import node_ip
from tests.support.s3 import CREDENTIALS, ThrottledProxy, moto_s3, upload_tree
from tests.support.wait import wait_until

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]
PADDING = 96 << 20  # an extra file beside the tiny model: at PACE the download lasts ~24 s
PACE = 4 << 20  # bytes per second through the proxy


@pytest.fixture
def s3_model(models_pv, tmp_path):
    """(endpoint the pods use, proxy) with the tiny model at s3://models/tiny."""
    src = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "kubellm.cli", "make-tiny-model", str(src)], check=True, capture_output=True)
    (src / "padding.dat").write_bytes(os.urandom(PADDING))
    host = node_ip()
    with moto_s3(host, log_path=tmp_path / "moto.log") as endpoint:
        upload_tree(endpoint, "models", "tiny", src)
        proxy = ThrottledProxy(host, endpoint, PACE)
        try:
            yield proxy
        finally:
            proxy.close()


@pytest.fixture
def cache_volume(kubectl, node, namespace):
    """A local PersistentVolume on the node for the claim `cached` (storageClassName "": made beforehand by an
    admin); removed with its directory afterwards."""
    path = node.state / f"cache-{namespace}"
    _make_cache_volume(kubectl, path, namespace, "cached")
    yield path
    kubectl("delete", "pv", f"cache-{namespace}", "--wait=false", check=False)
    shutil.rmtree(path, ignore_errors=True)


def _make_cache_volume(kubectl, path, ns: str, claim: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 1000, 1000)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"cache-{ns}"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node_name()]}
                            ]
                        }
                    ]
                }
            },
            "claimRef": {"namespace": ns, "name": claim},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(pv))


def test_second_replica_starts_from_the_cache_without_downloading(
    operator_installed, kubectl, namespace, s3_model, cache_volume
):
    ns, proxy = namespace, s3_model
    secret = {**CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url}
    kubectl(
        "create", "secret", "generic", "s3-creds", "-n", ns, *[f"--from-literal={k}={v}" for k, v in secret.items()]
    )
    cache = {"enabled": True, "size": "1Gi", "storageClassName": "", "accessMode": "ReadWriteOnce"}
    body = isvc("cached", "unused")
    body["spec"]["model"] = {"uri": "s3://models/tiny", "credentialsSecret": "s3-creds", "cache": cache}
    t0 = time.monotonic()
    apply(kubectl, ns, body)

    def downloading():
        st = get(kubectl, P, "cached", "-n", ns).get("status") or {}
        c = st.get("cache") or {}
        return st if c.get("phase") == "Downloading" and 0 < c.get("percent", 0) < 100 else None

    seen = wait_until(downloading, timeout=300, interval=1, what="status: the cache downloading, 0 < percent < 100")
    table = kubectl("get", "kisvc", "cached", "-n", ns).stdout
    print(f"[node] cache progress while downloading: {seen['cache']['progress']!r}; kubectl get kisvc:\n{table}")
    ready_cond = next(c for c in seen["conditions"] if c["type"] == "Ready")
    assert ready_cond["reason"] == "DownloadingModel" and "%" in ready_cond["message"]
    assert "cache downloading" in table and "DownloadingModel" in table
    assert {r["phase"] for r in seen["replicaStatuses"]} <= {"WaitingForCache", "Pending"}

    wait_isvc_ready(kubectl, ns, "cached", timeout=600)
    first_s = time.monotonic() - t0
    downloaded = proxy.sent
    assert downloaded > PADDING  # the model came through S3
    oai = service_client(kubectl, ns, "cached")
    (model,) = [m.id for m in oai.models.list().data]
    assert oai.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0).choices[0].text is not None
    job = get(kubectl, "job", "cached", "-n", ns)
    assert job["status"].get("succeeded") == 1
    # the real Job left the model's config in its termination message, and the operator read it (status)
    (cache_pod,) = [p for p in pods(kubectl, ns, "cached") if p["metadata"]["labels"].get("job-name") == "cached"]
    terminated = cache_pod["status"]["containerStatuses"][0]["state"]["terminated"]
    on_disk = json.loads((cache_volume / cache_subdir("s3://models/tiny") / "config.json").read_text())
    assert parse_config_report(terminated["message"]) == ("s3://models/tiny", fit.fit_config(on_disk))
    model_config = wait_until(
        lambda: get(kubectl, P, "cached", "-n", ns)["status"].get("modelConfig"),
        timeout=30,
        interval=1,
        what="status.modelConfig",
    )
    assert model_config["source"] == "modelCache" and model_config["pod"] == cache_pod["metadata"]["name"]
    assert f"num_hidden_layers {on_disk['num_hidden_layers']}" in model_config["message"]

    first_pods = {p["metadata"]["name"] for p in ready_pods(kubectl, ns, "cached")}
    # the runtime named its start-up phases in its log, where the operator's progress timer reads them
    runtime_log = kubectl("logs", next(iter(first_pods)), "-n", ns, "-c", "runtime").stdout
    phases = [p for line in runtime_log.splitlines() if (p := last_startup_phase(line))]
    assert phases == [LOADING_WEIGHTS, WARMING_UP], runtime_log[-2000:]
    t1 = time.monotonic()
    kubectl("scale", "kisvc", "cached", "-n", ns, "--replicas=2")
    wait_until(lambda: len(ready_pods(kubectl, ns, "cached")) == 2, timeout=300, interval=1, what="2 ready replicas")
    second_s = time.monotonic() - t1
    (second,) = [p for p in ready_pods(kubectl, ns, "cached") if p["metadata"]["name"] not in first_pods]
    # nothing was downloaded for it: no byte from S3, no second cache pod, the same Job, its init container only waited
    assert proxy.sent == downloaded
    cache_pods = [p for p in pods(kubectl, ns, "cached") if p["metadata"]["labels"].get("job-name") == "cached"]
    assert len(cache_pods) == 1
    assert get(kubectl, "job", "cached", "-n", ns)["metadata"]["uid"] == job["metadata"]["uid"]
    assert [c["name"] for c in second["spec"]["initContainers"]] == ["wait-for-model"]
    waited = kubectl("logs", second["metadata"]["name"], "-n", ns, "-c", "wait-for-model").stdout
    assert "is in" in waited
    oai2 = service_client(kubectl, ns, "cached")
    assert oai2.completions.create(model=model, prompt="hi", max_tokens=4).choices[0].text is not None
    status = get(kubectl, P, "cached", "-n", ns)["status"]
    print(
        f"[node] cache: first replica Ready {first_s:.0f}s after apply (download of {downloaded / 2**20:.1f} MiB "
        f"paced at {PACE / 2**20:.0f} MiB/s included); second replica Ready {second_s:.0f}s after the scale, "
        f"0 bytes downloaded; status.progress={status.get('progress')!r}"
    )
