"""Where each model's pods are: the router's view of the cluster, refreshed every `interval` seconds.

Two sources, one shape (`Route` per served model name):
- `KubernetesDiscovery`: the InferenceServices of one namespace (or all), each Service's EndpointSlices (Ready
  addresses on the API port), and scale through each Deployment's `scale` subresource (RBAC: list
  inferenceservices and endpointslices; get/patch deployments/scale — charts/kubellm/templates/router.yaml);
- `StaticDiscovery`: a JSON or YAML file (`models: {name: {endpoints: [url, ...], idleSeconds: s, pods: {url:
  name}, adapters: [name, ...]}}`), re-read when it changes: for tests, benchmarks and running the router outside
  a cluster. Its scaling and deletion costs are only recorded.

Both also keep each pod's `controller.kubernetes.io/pod-deletion-cost` at its load (RBAC: patch pods), so that a
scale-down removes idle pods rather than busy ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field, replace

import yaml

from kubellm import fit
from kubellm.operator.render import HTTP_PORT
from kubellm.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"  # the ReplicaSet removes low-cost pods first


@dataclass(frozen=True)
class Route:
    """One served model: the base URLs of its Ready pods, and (for scale to zero) what to scale and when."""

    model: str
    endpoints: tuple[str, ...] = ()
    scale_target: tuple[str, str] | None = None  # (namespace, Deployment) the router may scale 0 -> 1 -> 0
    idle_seconds: float | None = None  # back to 0 replicas after this long without a request (None: never)
    replicas: int | None = None  # the Deployment's desired replicas, when known (0: scaled to zero)
    pods: tuple[tuple[str, str, str], ...] = ()  # (endpoint URL, namespace, pod name) where the API says
    parent: str | None = None  # a LoRA adapter's route: the model it adapts (its endpoints: the pods holding it)
    adapters: tuple[str, ...] = ()  # the LoRA adapters its InferenceService declares (spec.adapters)
    # (endpoint URL, the adapters its pod holds) as the operator last reported them (status.replicaAdapters)
    reported_adapters: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def scales_to_zero(self) -> bool:
        return self.scale_target is not None and self.idle_seconds is not None


@dataclass
class StaticDiscovery:
    path: str
    scaled: list[tuple[str, int]] = field(default_factory=list)  # (model, replicas) asked, in order
    costs: dict[tuple[str, str], int] = field(default_factory=dict)
    _mtime: tuple = ()
    _routes: dict[str, Route] = field(default_factory=dict)
    _replicas: dict[str, int] = field(default_factory=dict)

    async def routes(self) -> dict[str, Route]:
        st = os.stat(self.path)
        mtime = (st.st_mtime_ns, st.st_ino)
        if mtime != self._mtime:
            with open(self.path) as f:
                doc = yaml.safe_load(f) or {}
            self._routes = {name: _static_route(name, entry) for name, entry in (doc.get("models") or {}).items()}
            self._mtime = mtime
        return {name: replace(r, replicas=self._replicas.get(name, r.replicas)) for name, r in self._routes.items()}

    async def wake(self, route: Route) -> bool:
        if self._replicas.get(route.model, route.replicas):
            return False
        await self.scale_to(route, 1)
        return True

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        self.costs[(namespace, pod)] = cost

    async def scale_to(self, route: Route, replicas: int) -> None:
        self.scaled.append((route.model, replicas))
        self._replicas[route.model] = replicas


def _static_route(name: str, entry) -> Route:
    if isinstance(entry, list):
        entry = {"endpoints": entry}
    idle = entry.get("idleSeconds")
    target = ("static", name) if idle is not None else None
    endpoints = tuple(u.rstrip("/") for u in entry.get("endpoints") or ())
    pods = tuple((u.rstrip("/"), "static", p) for u, p in (entry.get("pods") or {}).items())
    adapters = tuple(entry.get("adapters") or ())
    return Route(name, endpoints, target, idle, entry.get("replicas", len(endpoints)), pods, adapters=adapters)


class KubernetesDiscovery:
    """InferenceServices and their EndpointSlices through the Kubernetes API (the sync client, in a thread)."""

    def __init__(self, namespace: str | None, api_client=None):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    async def routes(self) -> dict[str, Route]:
        return await asyncio.to_thread(self._routes)

    def _routes(self) -> dict[str, Route]:
        ns = self.namespace
        if ns:
            isvcs = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            slices = self.discovery.list_namespaced_endpoint_slice(ns, label_selector="kubernetes.io/service-name")
        else:
            isvcs = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
            slices = self.discovery.list_endpoint_slice_for_all_namespaces(label_selector="kubernetes.io/service-name")
        ready: dict[tuple[str, str], list[str]] = {}
        refs: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for s in slices.items:
            key = (s.metadata.namespace, s.metadata.labels["kubernetes.io/service-name"])
            for e in s.endpoints or ():
                if e.conditions is None or e.conditions.ready is not False:
                    urls = [f"http://{_host(a)}:{HTTP_PORT}" for a in e.addresses]
                    ready.setdefault(key, []).extend(urls)
                    if e.target_ref is not None and e.target_ref.kind == "Pod":
                        ref = (e.target_ref.namespace or s.metadata.namespace, e.target_ref.name)
                        refs.setdefault(key, []).extend((u, *ref) for u in urls)
        routes = {}
        for isvc in isvcs:
            key = (isvc["metadata"]["namespace"], isvc["metadata"]["name"])
            route = isvc_route(isvc, sorted(set(ready.get(key, []))), tuple(sorted(set(refs.get(key, [])))))
            if route.model in routes:  # two services claim one name: keep the first, say so
                log.warning(json.dumps({"msg": "model served by two InferenceServices", "model": route.model}))
                continue
            routes[route.model] = route
        return routes

    async def wake(self, route: Route) -> bool:
        """Scale the Deployment 0 -> 1 (nothing if it already has replicas: pods are starting)."""
        return await asyncio.to_thread(self._wake, route)

    def _wake(self, route: Route) -> bool:
        ns, name = route.scale_target
        if self.apps.read_namespaced_deployment_scale(name, ns).spec.replicas:
            return False
        self.apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": 1}})
        return True

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        body = {"metadata": {"annotations": {DELETION_COST: str(cost)}}}
        await asyncio.to_thread(self.core.patch_namespaced_pod, pod, namespace, body)

    async def scale_to(self, route: Route, replicas: int) -> None:
        ns, name = route.scale_target
        await asyncio.to_thread(self.apps.patch_namespaced_deployment_scale, name, ns, {"spec": {"replicas": replicas}})


def held_adapters(routes: dict[str, Route], scraped: dict[str, dict[str, str] | None]) -> dict[str, dict[str, str]]:
    """Each pod URL's adapters (adapter → parent): what its /v1/models said, or, where it would not say (None:
    it checks API keys, which the router does not hold), what the operator reported in the status."""
    held = {url: adapters for url, adapters in scraped.items() if adapters is not None}
    for route in routes.values():
        for url, names in route.reported_adapters:
            if url not in held and url in scraped:
                held[url] = dict.fromkeys(names, route.model)
    return held


def adapter_routes(routes: dict[str, Route], held: dict[str, dict[str, str]]) -> dict[str, Route]:
    """Each LoRA adapter's route (pure): its parent's route narrowed to the Ready pods that hold it, by what each
    pod URL says it holds (adapter → parent). A name that is also a model's stays the model's."""
    holders: dict[str, tuple[Route, list[str]]] = {}
    for route in routes.values():
        for url in route.endpoints:
            for adapter, parent in held.get(url, {}).items():
                if parent != route.model or adapter in routes:
                    continue
                owner, urls = holders.setdefault(adapter, (route, []))
                if owner is route:  # two models' pods with a same-named adapter: the first model keeps the name
                    urls.append(url)
    return {
        adapter: replace(
            route,
            model=adapter,
            endpoints=tuple(urls),
            pods=tuple(p for p in route.pods if p[0] in urls),
            parent=route.model,
            scale_target=None,
            idle_seconds=None,
            adapters=(),
            reported_adapters=(),
        )
        for adapter, (route, urls) in holders.items()
    }


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def isvc_route(isvc: dict, endpoints: list[str], pods: tuple = ()) -> Route:
    """The Route of one InferenceService object (pure: unit-tested on plain dicts)."""
    meta, spec, status = isvc["metadata"], isvc.get("spec") or {}, isvc.get("status") or {}
    model = (spec.get("model") or {}).get("name") or meta["name"]
    autoscaling = spec.get("autoscaling") or {}
    # a model held at 0 because it does not fit its GPUs (the operator's fit check) is not woken by a request
    held = any(
        c.get("type") == "WorkloadReady" and c.get("reason") == fit.REASON for c in status.get("conditions") or []
    )
    zero = autoscaling.get("enabled", True) and autoscaling.get("minReplicas", 1) == 0 and not held
    idle = float(autoscaling.get("idleSeconds", 300)) if zero else None
    target = (meta["namespace"], meta["name"]) if zero else None
    adapters = tuple(a["name"] for a in spec.get("adapters") or () if isinstance(a, dict) and a.get("name"))
    by_pod = {r.get("pod"): tuple(r.get("adapters") or ()) for r in status.get("replicaAdapters") or ()}
    reported = tuple((url, by_pod[name]) for url, _, name in pods if name in by_pod)
    return Route(
        model,
        tuple(endpoints),
        target,
        idle,
        status.get("replicas"),
        pods,
        adapters=adapters,
        reported_adapters=reported,
    )
