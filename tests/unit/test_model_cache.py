"""model.cache, pure parts: the claim, the Job and the replicas' wait rendered from the spec; start-up progress
(cache and per-replica phases) computed from the Job, the claim, the pods and the downloaders' progress lines;
the Reconciler replacing an outdated Job and taking up a retained claim; the progress timer reading logs (the
downloaders' progress, the starting runtimes' phases: loading weights, warming up)."""

from __future__ import annotations

import datetime as dt

import pytest

import kubellm.operator.handlers as handlers
from kubellm.downloads import (
    LOADING_WEIGHTS,
    WARMING_UP,
    DownloadProgress,
    last_progress,
    last_startup_phase,
    parse_progress_line,
    progress_line,
    startup_line,
)
from kubellm.operator.policy import Refused
from kubellm.operator.reconcile import ours
from kubellm.operator.render import cache_subdir, render
from kubellm.operator.status import compute_status
from tests.support.recording_api import recording_reconciler

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
URI = "s3://models/tiny"


def isvc(spec: dict, name: str = "chat", uid: str = "uid-1") -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1}, "spec": spec}


def cached(**cache) -> dict:
    return {
        "model": {"uri": URI, "credentialsSecret": "s3-creds", "cache": {"enabled": True, **cache}},
        "scheduling": {"nodeSelector": {"gpu": "h200"}, "tolerations": [{"operator": "Exists"}]},
        "networkPolicy": {"enabled": True},
    }


def kinds(spec: dict, name: str = "chat") -> dict:
    return {c["kind"]: c for c in render(isvc(spec, name))}


def test_the_cache_renders_a_claim_a_job_and_replicas_that_wait_for_it_read_only():
    k = kinds(cached(size="20Gi", storageClassName="fast-rwx"))
    claim, job, dep = k["PersistentVolumeClaim"], k["Job"], k["Deployment"]
    assert claim["metadata"]["name"] == job["metadata"]["name"] == "chat"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-1"  # reclaim Delete: goes with the service
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "20Gi"}},
        "storageClassName": "fast-rwx",
    }
    model_dir = f"/models/{cache_subdir(URI)}"
    (fetch,) = job["spec"]["template"]["spec"]["containers"]
    assert fetch["command"][:4] == ["kubellm", "fetch-model", URI, model_dir]
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "chat"}}
    assert job_pod["automountServiceAccountToken"] is False and job_pod["securityContext"]["runAsNonRoot"]
    assert job_pod["nodeSelector"] == {"gpu": "h200"} and job_pod["tolerations"] == [{"operator": "Exists"}]
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in fetch["env"]  # the image's default is offline (for serve)
    secret_keys = [e["valueFrom"]["secretKeyRef"] for e in fetch["env"] if "valueFrom" in e]
    assert {s["name"] for s in secret_keys} == {"s3-creds"} and "AWS_ENDPOINT_URL" in {s["key"] for s in secret_keys}
    # the Job's pods are not the Service's, the PDB's or the NetworkPolicy's
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not all(job_labels.get(k) == v for k, v in k["Service"]["spec"]["selector"].items())

    pod = dep["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "chat", "readOnly": True}}
    (wait,) = pod["initContainers"]
    assert wait["command"] == ["kubellm", "wait-for-model", URI, model_dir]
    assert not any("valueFrom" in e for e in wait["env"])  # the replicas download nothing: no credentials
    assert all(m["readOnly"] for m in wait["volumeMounts"] if m["name"] == "model")
    runtime = pod["containers"][0]
    assert runtime["args"][1] == model_dir
    assert next(m for m in runtime["volumeMounts"] if m["name"] == "model")["readOnly"] is True
    egress_ports = [p["port"] for rule in k["NetworkPolicy"]["spec"]["egress"] for p in rule["ports"]]
    assert 443 not in egress_ports  # only the Job downloads


def test_retain_leaves_the_claim_unowned_and_no_cache_renders_neither():
    claim = kinds(cached(reclaim="Retain", storageClassName=""))["PersistentVolumeClaim"]
    assert "ownerReferences" not in claim["metadata"] and claim["spec"]["storageClassName"] == ""
    plain = kinds({"model": {"uri": URI}})
    assert "Job" not in plain and "PersistentVolumeClaim" not in plain
    (fetch,) = plain["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    assert fetch["name"] == "fetch-model" and {"name": "HF_HUB_OFFLINE", "value": "0"} in fetch["env"]
    assert cache_subdir(URI) != cache_subdir(URI + "-v2")  # a new URI never reads the old copy


def test_progress_lines_round_trip_and_other_lines_are_ignored():
    p = DownloadProgress(URI, 3 << 20, 12 << 20, 1, 4)
    assert parse_progress_line(progress_line(p)) == p
    assert parse_progress_line("Traceback (most recent call last):") is None
    assert parse_progress_line('{"other": 1}') is None
    assert last_progress(progress_line(p) + "\nsome warning\n") == p
    assert p.summary() == "25% (3.0 MiB of 12.0 MiB, 1/4 files)"
    assert DownloadProgress(URI, 10, None, 0, None).percent is None


def job(active=0, succeeded=0, failed_message=None) -> dict:
    conditions = []
    if succeeded:
        conditions.append({"type": "Complete", "status": "True"})
    if failed_message:
        conditions.append({"type": "Failed", "status": "True", "message": failed_message})
    return {
        "metadata": {"name": "chat"},
        "status": {"active": active, "succeeded": succeeded, "conditions": conditions},
    }


def pod(name: str, init: str | None = None, running: bool = False, ready: bool = False) -> dict:
    status: dict = {"phase": "Running" if running or ready else "Pending", "startTime": "2026-12-01T11:59:00Z"}
    if init:
        status["initContainerStatuses"] = [{"name": init, "state": {"running": {}}, "restartCount": 0}]
    if running or ready:
        status["containerStatuses"] = [{"name": "runtime", "state": {"running": {}}, "ready": ready, "restartCount": 0}]
    status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": {"name": name, "creationTimestamp": "2026-12-01T11:59:00Z"}, "status": status}


DEPLOYMENT = {"spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 0}}
BOUND = {"metadata": {"name": "chat"}, "status": {"phase": "Bound"}}


def status_of(job_obj, claim, pods, downloads=None, deployment=DEPLOYMENT) -> dict:
    return compute_status(isvc(cached()), deployment, None, pods, now=NOW, cache=(job_obj, claim), downloads=downloads)


def test_status_says_how_far_the_cache_download_is_while_replicas_wait():
    progress = DownloadProgress(URI, 30 << 20, 120 << 20, 2, 5)
    s = status_of(job(active=1), BOUND, [pod("chat-a", init="wait-for-model"), pod("chat-b")], {"chat": progress})
    assert s["cache"]["phase"] == "Downloading" and s["cache"]["percent"] == 25.0
    ready = s["conditions"][0]
    assert ready["status"] == "False" and ready["reason"] == "DownloadingModel" and "25% (30.0 MiB" in ready["message"]
    assert [r["phase"] for r in s["replicaStatuses"]] == ["WaitingForCache", "Pending"]
    assert s["progress"].startswith("cache downloading 25% (30.0 MiB of 120.0 MiB")


def test_status_of_a_pending_claim_a_failed_job_and_a_filled_cache():
    pending = status_of(None, {"metadata": {"name": "chat"}, "status": {"phase": "Pending"}}, [])
    assert pending["conditions"][0]["reason"] == "ModelCachePending" and "not bound" in pending["cache"]["message"]
    failed = status_of(job(failed_message="BackoffLimitExceeded"), BOUND, [pod("chat-a", init="wait-for-model")])
    assert (
        failed["conditions"][0]["reason"] == "ModelCacheFailed" and "BackoffLimitExceeded" in failed["cache"]["message"]
    )
    done = DownloadProgress(URI, 5, 5, 1, 1, done=True)
    filled = status_of(
        job(succeeded=1), BOUND, [pod("chat-a", ready=True), pod("chat-b", running=True)], {"chat": done}
    )
    assert filled["cache"]["phase"] == "Ready" and "100%" in filled["cache"]["message"]
    assert [r["phase"] for r in filled["replicaStatuses"]] == ["Ready", "Loading"]
    assert filled["progress"] == "1/2 ready; 1 loading"


def test_a_replica_downloading_without_a_cache_shows_its_own_progress():
    progress = DownloadProgress("hf://a/b", 1 << 30, 4 << 30, 1, 3)
    s = compute_status(
        isvc({"model": {"uri": "hf://a/b"}}),
        DEPLOYMENT,
        None,
        [pod("chat-a", init="fetch-model")],
        now=NOW,
        downloads={"chat-a": progress},
    )
    assert s["cache"] is None
    assert s["replicaStatuses"] == [{"pod": "chat-a", "phase": "Downloading", "progress": progress.summary()}]
    assert s["conditions"][0]["reason"] == "DownloadingModel" and "chat-a" in s["conditions"][0]["message"]


def test_a_changed_uri_replaces_the_job_and_a_retained_claim_is_taken_up_by_its_namesake():
    r, api = recording_reconciler()
    first = isvc(cached(reclaim="Retain"), uid="uid-1")
    api.isvc = first
    r.reconcile(first)
    spec = cached(reclaim="Retain")
    changed = isvc({**spec, "model": {**spec["model"], "uri": "s3://models/tiny-v2"}})
    api.calls.clear()
    r.reconcile(changed)
    assert ("Job", "delete") in api.calls and ("Job", "create") in api.calls  # replaced, not applied over
    assert api.store[("Job", "ns", "chat")]["metadata"]["annotations"]["kubellm.io/model-uri"] == "s3://models/tiny-v2"
    api.calls.clear()
    r.reconcile(changed)
    assert ("Job", "delete") not in api.calls  # unchanged: left alone
    # the InferenceService is deleted and made again under the same name (a new uid): the claim stays, is ours
    r.delete_children(first)
    claim = api.store[("PersistentVolumeClaim", "ns", "chat")]
    assert claim is not None and "ownerReferences" not in claim["metadata"]
    again = isvc(cached(reclaim="Retain"), uid="uid-2")
    assert ours({**claim, "kind": "PersistentVolumeClaim"}, again)
    r.reconcile(again)
    # a claim of that name that is not a kubellm cache is a stranger's: refused, untouched
    api.store[("PersistentVolumeClaim", "ns", "other")] = {
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "other",
            "namespace": "ns",
            "uid": "x",
            "labels": {"kubellm.io/inferenceservice": "other"},
        },
        "spec": {},
    }
    with pytest.raises(Refused) as e:
        r.reconcile(isvc(cached(), name="other", uid="uid-3"))
    assert e.value.reason == "ChildConflict" and "PersistentVolumeClaim ns/other" in e.value.message


def test_the_progress_timer_reads_the_running_downloaders_logs():
    r, api = recording_reconciler()
    handlers._reconciler = r
    try:
        job_pod = pod("chat-xyz")
        job_pod["metadata"]["labels"] = {"job-name": "chat"}
        job_pod["status"] = {
            "phase": "Running",
            "containerStatuses": [{"name": "fetch-model", "state": {"running": {}}}],
        }
        replica = pod("chat-a", init="fetch-model")
        waiting = pod("chat-b", init="wait-for-model")
        line = progress_line(DownloadProgress(URI, 1, 4, 0, 2))
        api.pod_logs = {
            ("ns", "chat-xyz", "fetch-model"): f"{line}\n",
            ("ns", "chat-a", "fetch-model"): f"{line}\nwarn\n",
        }
        key = ("ns", "chat")
        handlers.read_download_progress(
            namespace="ns",
            name="chat",
            pod_index={key: [replica, waiting]},
            cache_pod_index={key: [job_pod]},
            job_index={key: [{"metadata": {"name": "chat"}}]},
        )
        assert handlers._downloads[key] == {"chat": parse_progress_line(line), "chat-a": parse_progress_line(line)}
    finally:
        handlers._reconciler = None
        handlers._downloads.clear()


# ------------------------------------------------------------------ a runtime's start-up phases
def test_startup_lines_name_the_last_phase_among_other_log_lines():
    server_line = '{"ts": 1.0, "level": "info", "logger": "kubellm.server", "event": "ready"}'
    text = "\n".join([startup_line(LOADING_WEIGHTS), "KV cache: 64 blocks", startup_line(WARMING_UP), server_line])
    assert last_startup_phase(text) == WARMING_UP
    assert last_startup_phase(startup_line(LOADING_WEIGHTS) + "\nUserWarning: ...\n") == LOADING_WEIGHTS
    assert last_startup_phase('{"kubellmStartup": "Dancing"}\nplain\n') is None  # only the phases there are
    assert last_startup_phase("") is None


def test_a_starting_replica_shows_the_phase_its_runtime_named():
    pods = [pod("chat-a", running=True), pod("chat-b", running=True), pod("chat-c", running=True)]
    s = compute_status(
        isvc({"model": {"uri": "hf://a/b"}}),
        DEPLOYMENT,
        None,
        pods,
        now=NOW,
        phases={"chat-a": LOADING_WEIGHTS, "chat-b": WARMING_UP},
    )
    assert [r["phase"] for r in s["replicaStatuses"]] == ["LoadingWeights", "WarmingUp", "Loading"]
    assert s["progress"] == "0/3 ready; 1 loading weights; 1 warming up; 1 loading"


def test_the_progress_timer_reads_the_phase_of_running_runtimes_that_are_not_ready():
    r, api = recording_reconciler()
    handlers._reconciler = r
    try:
        api.pod_logs = {
            ("ns", "chat-a", "runtime"): f"{startup_line(LOADING_WEIGHTS)}\n",
            ("ns", "chat-b", "runtime"): f"{startup_line(LOADING_WEIGHTS)}\n{startup_line(WARMING_UP)}\nKV cache\n",
            ("ns", "chat-c", "runtime"): f"{startup_line(WARMING_UP)}\n",  # Ready: its log is not read again
        }
        key = ("ns", "chat")
        starting = [pod("chat-a", running=True), pod("chat-b", running=True), pod("chat-c", ready=True)]
        handlers.read_download_progress(
            namespace="ns", name="chat", pod_index={key: starting}, cache_pod_index={}, job_index={}
        )
        assert handlers._phases[key] == {"chat-a": LOADING_WEIGHTS, "chat-b": WARMING_UP}
        handlers.read_download_progress(
            namespace="ns", name="chat", pod_index={key: [pod("chat-c", ready=True)]}, cache_pod_index={}, job_index={}
        )
        assert key not in handlers._phases
    finally:
        handlers._reconciler = None
        handlers._phases.clear()
