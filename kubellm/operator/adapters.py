"""spec.adapters onto the Ready runtime pods: what to load or unload where (`plan`, pure), one pod brought to it
through the runtime's own API (`sync_pod`: GET /v1/models, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter; the pods run with --allow-runtime-lora-updating and --admin-key-file, the key in a Secret
the operator makes, so only the operator may call these), and what the status says (`adapter_status`, pure).
handlers.py runs `sync_pods` from a kopf timer and keeps its result in memory for the status timer.

A load the runtime refuses (a 4xx: rank above runtime.maxLoraRank, an unreadable directory, too many adapters)
is not retried on that pod for RETRY_FAILED_S, and its message becomes the AdaptersReady condition; the base model
keeps serving (AdaptersReady is not part of Ready)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from kubellm.operator.render import HTTP_PORT

SYNC_INTERVAL_S = 3.0
RETRY_FAILED_S = 60.0
LIST_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 300.0  # a large adapter read from a slow volume


@dataclass(frozen=True)
class Action:
    op: str  # "load" | "unload"
    name: str
    path: str | None = None


@dataclass(frozen=True)
class Failure:
    path: str
    message: str
    at: float


@dataclass
class PodAdapters:
    """One pod as last seen: the adapters it holds (name → path), loads it refused, or why it was not reached."""

    loaded: dict[str, str] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    unreachable: str | None = None
    denied: bool = False  # the pod refused our key (401/403): the caller reads the key afresh


def plan(desired: dict[str, str], loaded: dict[str, str], failures: dict[str, Failure], now: float) -> list[Action]:
    """The calls that bring a pod holding `loaded` to `desired` (both name → path): unloads first (they free
    slots), then loads; an adapter whose path changed is unloaded and loaded again; a load refused less than
    RETRY_FAILED_S ago for the same path is not tried again yet."""
    unloads = [Action("unload", n) for n in sorted(loaded) if desired.get(n) != loaded[n]]
    loads = []
    for name in sorted(desired):
        if loaded.get(name) == desired[name]:
            continue
        failed = failures.get(name)
        if failed and failed.path == desired[name] and now - failed.at < RETRY_FAILED_S:
            continue
        loads.append(Action("load", name, desired[name]))
    return unloads + loads


def _error_message(status: int, text: str) -> str:
    try:
        return f"{status}: {json.loads(text)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {text[:500]}"


class Denied(Exception):
    pass


async def _loaded(session: aiohttp.ClientSession, url: str, headers: dict) -> dict[str, str]:
    timeout = aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
    async with session.get(f"{url}/v1/models", headers=headers, timeout=timeout) as r:
        if r.status != 200:
            message = _error_message(r.status, await r.text())
            raise Denied(message) if r.status in (401, 403) else RuntimeError(message)
        data = (await r.json()).get("data") or []
    return {m["id"]: m.get("root") or "" for m in data if m.get("parent")}


async def sync_pod(
    session: aiohttp.ClientSession,
    url: str,
    desired: dict[str, str],
    key: str | None,
    before: PodAdapters | None = None,
) -> PodAdapters:
    """Bring one pod (its base URL) to `desired`, calling with `key` (the pods' admin key); what it holds
    afterwards, and the loads it refused."""
    failures = dict(before.failures) if before else {}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        loaded = await _loaded(session, url, headers)
    except (aiohttp.ClientError, TimeoutError, RuntimeError, Denied) as e:
        held = dict(before.loaded) if before else {}
        return PodAdapters(held, failures, f"GET /v1/models: {e or type(e).__name__}", isinstance(e, Denied))
    failures = {n: f for n, f in failures.items() if desired.get(n) == f.path}  # only for what is still wanted
    now = time.monotonic()
    for action in plan(desired, loaded, failures, now):
        body = {"lora_name": action.name} | ({"lora_path": action.path} if action.path else {})
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)
        try:
            async with session.post(
                f"{url}/v1/{action.op}_lora_adapter", json=body, headers=headers, timeout=timeout
            ) as r:
                text = await r.text()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as e:
            return PodAdapters(loaded, failures, f"POST /v1/{action.op}_lora_adapter: {e or type(e).__name__}")
        if status in (401, 403):  # our key, not the adapter: try again with the key read afresh
            message = f"POST /v1/{action.op}_lora_adapter: {_error_message(status, text)}"
            return PodAdapters(loaded, failures, message, denied=True)
        if action.op == "unload":
            if status in (200, 404):  # 404: gone already
                loaded.pop(action.name, None)
            continue
        if status == 200:
            loaded[action.name] = action.path
            failures.pop(action.name, None)
        elif 400 <= status < 500:
            failures[action.name] = Failure(action.path, _error_message(status, text), now)
        else:  # the pod is in trouble (503 draining, 5xx): try again next round
            return PodAdapters(loaded, failures, f"POST /v1/load_lora_adapter: {_error_message(status, text)}")
    return PodAdapters(loaded, failures)


def pod_url(pod: dict) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    return f"http://[{ip}]:{HTTP_PORT}" if ":" in ip else f"http://{ip}:{HTTP_PORT}"


def is_ready(pod: dict) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def sync_pods(
    pods: list[dict], desired: dict[str, str], key: str | None, before: dict[str, PodAdapters]
) -> dict[str, PodAdapters]:
    """Every Ready pod brought to `desired`, at once; pod name → what it holds. Pods not Ready are left out (a
    restarted pod loads everything again once Ready)."""
    targets = {p["metadata"]["name"]: url for p in pods if is_ready(p) and (url := pod_url(p))}
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(sync_pod(session, url, desired, key, before.get(name)) for name, url in targets.items())
        )
    return dict(zip(targets, results, strict=True))


def adapter_status(desired: dict[str, str], pods: dict[str, PodAdapters]) -> tuple[list[dict], tuple | None]:
    """(status.replicaAdapters: each Ready pod and the adapters it holds, the AdaptersReady condition as (status,
    reason, message) or None when no adapter is wanted or held)."""
    replicas = [{"pod": name, "adapters": sorted(p.loaded)} for name, p in sorted(pods.items())]
    if not desired and not any(p.loaded for p in pods.values()):
        return replicas, None
    failed = [(pod, n, f) for pod, p in sorted(pods.items()) for n, f in sorted(p.failures.items())]
    if failed:
        pod, name, f = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return replicas, (False, "AdapterLoadFailed", f"adapter {name} on pod {pod}: {f.message}{more}")
    unreachable = [(pod, p.unreachable) for pod, p in sorted(pods.items()) if p.unreachable]
    if unreachable:
        return replicas, (None, "PodUnreachable", f"pod {unreachable[0][0]}: {unreachable[0][1]}")
    if not pods:
        return replicas, (False, "NoReadyReplicas", "no Ready replica to load adapters onto yet")
    behind = [(pod, p) for pod, p in sorted(pods.items()) if p.loaded != desired]
    if behind:
        pod, p = behind[0]
        missing = sorted(set(desired) - set(p.loaded)) or sorted(set(p.loaded) - set(desired))
        return replicas, (False, "Syncing", f"pod {pod} holds {sorted(p.loaded)}; working on {missing}")
    return replicas, (True, "Loaded", f"{len(desired)} adapters on {len(pods)} Ready replicas")
