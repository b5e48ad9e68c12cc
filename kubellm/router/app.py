"""The router's HTTP side (aiohttp server and client): `/v1/models` from discovery, every other `/v1/*` POST
forwarded by the body's `model` to a pod the policy picks, streamed through chunk by chunk.

Failure handling, in order: unknown model → 404; a model with no Ready pod is held (bounded count and time;
scaled 0 → 1 when it scales to zero) → 429/503 + Retry-After beyond the bounds; every pod saturated → 429 +
Retry-After; a connection failure (or a draining pod's 503) before the first byte → the next pod on the policy's
list; a failure after it → the stream ends with an error event (SSE) or a cut connection."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubellm.router.discovery import Route, adapter_routes, held_adapters
from kubellm.router.metrics import RouterMetrics
from kubellm.router.policy import Limits, PodLoad, Policy, deletion_cost, make_policy, prompt_prefix
from kubellm.router.scrape import Scraper
from kubellm.tracing import Tracing

log = logging.getLogger("kubellm.router")

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
RETRY_STATUSES = (502, 503)  # a pod that is draining or whose server is not up yet: another pod may answer


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "prefix"
    prefix_chars: int = 256
    refresh_seconds: float = 1.0
    scrape_seconds: float = 0.5
    stale_seconds: float = 2.0
    max_attempts: int = 3
    connect_timeout: float = 3.0
    # no byte from a pod for this long ends the request (a pod gone without closing its connections, e.g. its
    # node or network vanished, would otherwise hold the client for the kernel's ~15 min TCP timeout)
    read_timeout: float = 600.0
    down_seconds: float = 5.0  # a pod that refused a connection is skipped this long
    max_held_requests: int = 64  # per model with no Ready pod
    hold_seconds: float = 300.0
    adapter_wait_seconds: float = 30.0  # a declared adapter's wait for a Ready pod to hold it, once the model is up
    retry_after_seconds: float = 1.0
    cost_seconds: float = 5.0  # how often pods' deletion costs are brought up to date
    limits: Limits = Limits()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    def response(self) -> web.Response:
        kind = {404: "NotFoundError", 429: "RateLimitError", 503: "ServiceUnavailableError"}.get(
            self.status, "invalid_request_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else None
        return web.json_response(body, status=self.status, headers=headers)


class Router:
    def __init__(
        self,
        discovery,
        config: RouterConfig = RouterConfig(),
        policy: Policy | None = None,
        tracing: Tracing | None = None,
    ):
        self.discovery, self.config = discovery, config
        self.tracing = tracing  # None: no spans, the client's traceparent (or a new one) passed on as it is
        self.policy = policy or make_policy(config.policy, config.limits)
        self.routes: dict[str, Route] = {}
        self.discovered = False
        self.changed = asyncio.Condition()
        self.in_flight: dict[str, int] = {}  # pod URL -> open requests through this router
        self.model_in_flight: dict[str, int] = {}
        self.down_until: dict[str, float] = {}
        self.held: dict[str, int] = {}
        self.last_request: dict[str, float] = {}
        self.pod_finished: dict[str, float] = {}  # model -> its pods' finished-request counters, summed
        self.asleep: set[str] = set()  # models this router scaled to zero
        self.costs: dict[tuple[str, str], int] = {}  # (namespace, pod) -> the deletion cost last written
        self.started, self.started_wall = time.monotonic(), time.time()
        self.metrics = RouterMetrics()
        self.scraper = Scraper(config.scrape_seconds, config.stale_seconds)
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application | None = None) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        await self.scraper.start()
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._refresh_loop()),
            asyncio.create_task(self._idle_loop()),
            asyncio.create_task(self._cost_loop()),
        ]

    async def stop(self, app: web.Application | None = None) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.scraper.stop()
        if self.session:
            await self.session.close()
        if self.tracing:
            await asyncio.to_thread(self.tracing.shutdown)  # the last batch of spans goes out

    async def refresh(self) -> None:
        try:
            routes = await self.discovery.routes()
        except Exception as e:  # keep routing on the last view; say why it is stale
            log.warning(json.dumps({"msg": "discovery failed", "error": repr(e)}))
            return
        async with self.changed:
            self.routes, self.discovered = routes, True
            self.changed.notify_all()
        self.scraper.watch({u for r in routes.values() for u in r.endpoints})
        for r in routes.values():
            self.metrics.endpoints.labels(r.model).set(len(r.endpoints))
            if r.replicas is not None:
                self.metrics.replicas.labels(r.model).set(r.replicas)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_seconds)
            await self.refresh()

    async def _idle_loop(self) -> None:
        """Scale a model that scales to zero back to 0 after its idle window without requests."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for route in list(self.routes.values()):
                if route.model in self.asleep and route.endpoints and route.replicas:
                    self.asleep.discard(route.model)  # scaled up by someone else: its idle window runs again
                    self.last_request[route.model] = now
                if not route.scales_to_zero or route.replicas == 0 or route.model in self.asleep:
                    continue
                busy = self.held.get(route.model, 0) or self.model_in_flight.get(route.model, 0)
                pods_busy, finished = self.scraper.busy(route.endpoints)
                if pods_busy or finished != self.pod_finished.get(route.model, finished):
                    self.last_request[route.model] = now  # others' traffic: the pods worked since the last look
                self.pod_finished[route.model] = finished
                last = self.last_request.get(route.model, self.started)
                if busy or now - last < route.idle_seconds:
                    continue
                try:
                    await self.discovery.scale_to(route, 0)
                except Exception as e:
                    log.warning(json.dumps({"msg": "scale to zero failed", "model": route.model, "error": repr(e)}))
                    continue
                self.asleep.add(route.model)  # until a request wakes it (the status' replica count lags)
                self.metrics.scaled.labels(route.model, "0").inc()
                log.info(json.dumps({"msg": "scaled to zero", "model": route.model, "idle_s": round(now - last)}))
                await self.refresh()

    async def _cost_loop(self) -> None:
        """Keep each pod's deletion cost at its load, writing only what changed."""
        while True:
            await asyncio.sleep(self.config.cost_seconds)
            wanted = {}
            for route in list(self.routes.values()):
                loads = self.pod_loads(route)
                for url, namespace, pod in route.pods:
                    if url in loads:
                        wanted[(namespace, pod)] = deletion_cost(loads[url])
            for key, cost in wanted.items():
                if self.costs.get(key) == cost:
                    continue
                try:
                    await self.discovery.set_deletion_cost(*key, cost)
                    self.costs[key] = cost
                except Exception as e:  # a pod gone meanwhile, or no RBAC for it: routing goes on
                    log.warning(json.dumps({"msg": "deletion cost not set", "pod": "/".join(key), "error": repr(e)}))
            self.costs = {k: v for k, v in self.costs.items() if k in wanted}

    # ------------------------------------------------------------------ choosing
    def pod_loads(self, route: Route) -> dict[str, PodLoad]:
        now = time.monotonic()
        pods = {}
        for url in route.endpoints:
            if self.down_until.get(url, 0.0) > now:
                continue
            g = self.scraper.gauges(url)
            pods[url] = PodLoad(self.in_flight.get(url, 0), *g) if g else PodLoad(self.in_flight.get(url, 0))
        return pods

    async def ready_route(self, model: str) -> Route:
        """The model's route once it has a Ready pod: at once, or after holding this request (bounded) while the
        model scales up from zero or its pods start."""
        route = self.routes[model]
        if route.endpoints:
            return route
        c = self.config
        if self.held.get(model, 0) >= c.max_held_requests:
            self.metrics.rejected.labels(model, "held_full").inc()
            raise ApiError(
                429, f"model {model!r} is starting; too many requests waiting for it", None, c.retry_after_seconds
            )
        self.held[model] = self.held.get(model, 0) + 1
        self.metrics.held.labels(model).inc()
        try:
            if route.scale_target is not None:
                await self._wake(route)
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self._has_endpoints(model)), c.hold_seconds)
                except TimeoutError:
                    self.metrics.rejected.labels(model, "hold_timeout").inc()
                    raise ApiError(503, f"model {model!r} has no Ready pod yet", None, c.retry_after_seconds) from None
            if model not in self.routes:  # its InferenceService was deleted while the request waited
                raise ApiError(404, f"The model `{model}` does not exist.", "model")
            return self.routes[model]
        finally:
            self.held[model] -= 1
            self.metrics.held.labels(model).dec()

    def adapter_routes(self) -> dict[str, Route]:
        return adapter_routes(self.routes, held_adapters(self.routes, self.scraper.adapters))

    async def route_for(self, model: str) -> Route:
        """A model's route (held while it has no Ready pod), or a LoRA adapter's: the pods that hold it."""
        if model not in self.routes:
            adapter = self.adapter_routes().get(model)
            if adapter is not None:
                self.last_request[adapter.parent] = time.monotonic()  # adapter traffic keeps its model up
                return adapter
            parent = next((r for r in self.routes.values() if model in r.adapters), None)
            if parent is None:
                raise ApiError(404, f"The model `{model}` does not exist.", "model")
            return await self._loaded_adapter(model, parent.model)
        self.last_request[model] = time.monotonic()
        self.asleep.discard(model)
        return await self.ready_route(model)

    async def _loaded_adapter(self, adapter: str, parent: str) -> Route:
        """An adapter its InferenceService declares but no Ready pod holds yet (the model at zero, its pods
        starting, the operator still loading it): held while the model wakes, then up to adapter_wait_seconds for
        a pod to hold it; 503 + Retry-After beyond (an adapter that fails to load says why in its service's
        AdaptersReady condition)."""
        self.last_request[parent] = time.monotonic()
        self.asleep.discard(parent)
        await self.ready_route(parent)
        c = self.config
        if self.held.get(adapter, 0) >= c.max_held_requests:
            raise ApiError(429, f"too many requests waiting for adapter {adapter!r}", None, c.retry_after_seconds)
        self.held[adapter] = self.held.get(adapter, 0) + 1
        try:
            deadline = time.monotonic() + c.adapter_wait_seconds
            while time.monotonic() < deadline:
                found = self.adapter_routes().get(adapter)
                if found is not None:
                    return found
                await asyncio.sleep(0.25)
        finally:
            self.held[adapter] -= 1
        message = f"adapter {adapter!r} of model {parent!r} is not loaded on a Ready pod yet"
        raise ApiError(503, message, None, c.retry_after_seconds)

    def _has_endpoints(self, model: str) -> bool:
        route = self.routes.get(model)
        return route is None or bool(route.endpoints)

    async def _wake(self, route: Route) -> None:
        self.asleep.discard(route.model)
        try:
            woke = await self.discovery.wake(route)
        except Exception as e:
            log.warning(json.dumps({"msg": "scale from zero failed", "model": route.model, "error": repr(e)}))
            raise ApiError(
                503, f"model {route.model!r} could not be scaled up", None, self.config.retry_after_seconds
            ) from e
        if woke:
            self.metrics.scaled.labels(route.model, "1").inc()
            log.info(json.dumps({"msg": "scaling from zero", "model": route.model}))

    # ------------------------------------------------------------------ HTTP
    async def models(self, request: web.Request) -> web.Response:
        created = int(self.started_wall)
        data = [
            {"id": r.model, "object": "model", "created": created, "owned_by": "kubellm"}
            for r in sorted(self.routes.values(), key=lambda r: r.model)
            if r.endpoints or r.scales_to_zero
        ]
        parents = {name: a.parent for name, a in self.adapter_routes().items()}
        for r in self.routes.values():  # a model at zero: its declared adapters, as the model itself is listed
            if r.scales_to_zero and not r.endpoints:
                parents |= {a: r.model for a in r.adapters if a not in self.routes and a not in parents}
        data += [  # vLLM's shape: an adapter is a model whose parent is the one it adapts
            {"id": name, "object": "model", "created": created, "owned_by": "kubellm", "parent": parent}
            for name, parent in sorted(parents.items())
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.discovered}, status=200 if self.discovered else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await request.read()
        headers = _forward_headers(request)
        span = self.tracing.start_server_span(f"POST {request.path}", request.headers) if self.tracing else None
        if span is not None:
            self.tracing.inject(span, headers)  # the pod's span is this one's child
        model, status, pod, attempts, affinity = "", 0, None, 0, None
        try:
            doc = _json_object(body)
            model = _model_of(doc)
            route = await self.route_for(model)
            choice = self.policy.choose(prompt_prefix(doc, self.config.prefix_chars), self.pod_loads(route))
            if not choice.order:
                self.metrics.rejected.labels(model, "saturated").inc()
                raise ApiError(429, f"every pod of model {model!r} is saturated", None, self.config.retry_after_seconds)
            affinity = choice.affinity
            self.metrics.routed.labels(model, "affinity" if affinity else "spill").inc()
            response, pod, attempts = await self._send(request, headers, body, model, choice.order)
            status = response.status
            return response
        except ApiError as e:
            status = e.status
            self.metrics.requests.labels(model if model in self.routes else "", str(e.status)).inc()
            return e.response()
        finally:
            if model in self.routes:  # (names from clients: only known ones, or the dict grows without bound)
                self.last_request[model] = time.monotonic()
            if span is not None:
                self._end_span(span, request, model, pod, status, attempts, affinity)
            log.info(
                json.dumps(
                    {
                        "msg": "request",
                        "path": request.path,
                        "model": model,
                        "pod": pod,
                        "status": status,
                        "attempts": attempts,
                        "affinity": affinity,
                        "ms": round((time.monotonic() - started) * 1000, 1),
                        "trace_id": _trace_id(headers.get("traceparent")),
                    }
                )
            )

    def _end_span(self, span, request: web.Request, model: str, pod, status: int, attempts: int, affinity) -> None:
        attributes = {
            "http.request.method": request.method,
            "url.path": request.path,
            "http.response.status_code": status,
            "gen_ai.request.model": model or None,
            "kubellm.router.pod": pod,
            "kubellm.router.attempts": attempts,
            "kubellm.router.retries": max(0, attempts - 1),
            "kubellm.router.affinity": affinity,
        }
        error = None if 0 < status < 500 else f"HTTP {status}" if status else "no response"
        self.tracing.end(span, attributes, error=error)

    async def _send(self, request: web.Request, headers: dict, body: bytes, model: str, order: list[str]):
        """Try pods in order until one answers (headers received), then stream its answer through."""
        last_error = "no pod answered"
        tried = 0
        for pod in order[: self.config.max_attempts]:
            tried += 1
            self._open(pod, model, +1)
            try:
                upstream = await self.session.post(pod + request.path_qs, data=body, headers=headers)
            except (aiohttp.ClientConnectionError, TimeoutError) as e:
                self._open(pod, model, -1)
                self.down_until[pod] = time.monotonic() + self.config.down_seconds
                self.metrics.attempts.labels(model, "connect_error").inc()
                last_error = f"{type(e).__name__}"
                continue
            if upstream.status in RETRY_STATUSES and tried < min(len(order), self.config.max_attempts):
                upstream.release()
                self._open(pod, model, -1)
                self.metrics.attempts.labels(model, f"upstream_{upstream.status}").inc()
                last_error = f"HTTP {upstream.status}"
                continue
            self.metrics.attempts.labels(model, "ok").inc()
            try:
                response = await self._stream(request, upstream, model)
            finally:
                self._open(pod, model, -1)
            return response, pod, tried
        raise ApiError(503, f"no pod of model {model!r} answered ({last_error})", None, self.config.retry_after_seconds)

    async def _stream(self, request: web.Request, upstream: aiohttp.ClientResponse, model: str) -> web.StreamResponse:
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    response.headers.add(k, v)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            self.metrics.requests.labels(model, str(upstream.status)).inc()
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as e:
                # the pod went away mid-answer: nothing can be retried once bytes reached the client
                self.metrics.attempts.labels(model, "broken_stream").inc()
                if upstream.content_type == "text/event-stream":
                    err = {
                        "error": {
                            "message": f"the model's pod failed mid-stream ({type(e).__name__})",
                            "type": "server_error",
                            "code": 502,
                        }
                    }
                    await response.write(f"data: {json.dumps(err)}\n\n".encode())
                else:
                    response.force_close()  # a cut connection: the client sees a short body, not a whole one
                    if request.transport is not None:
                        request.transport.close()
                    return response
            await response.write_eof()
            return response

    def _open(self, pod: str, model: str, delta: int) -> None:
        self.in_flight[pod] = self.in_flight.get(pod, 0) + delta
        self.model_in_flight[model] = self.model_in_flight.get(model, 0) + delta
        self.metrics.in_flight.labels(model).inc(delta)


def _json_object(body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return doc


def _model_of(doc: dict) -> str:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required: the served model name (see GET /v1/models)", "model")
    return model


def _forward_headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    if "traceparent" in request.headers:  # W3C trace context: one trace id from the client, or from here, down
        headers["traceparent"] = request.headers["traceparent"]
    else:  # flagged sampled: a pod that traces while this router does not still records its span in this trace
        # (OpenTelemetry's default parent-based sampler drops the children of an unsampled parent)
        headers["traceparent"] = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
    return headers


def _trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


def create_app(router: Router, max_body_bytes: int = 32 << 20) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_get("/health", router.health)
    app.router.add_get("/ready", router.ready)
    app.router.add_get("/metrics", router.prometheus)
    app.router.add_get("/v1/models", router.models)
    app.router.add_post("/v1/{tail:.+}", router.forward)
    for path in ("/tokenize", "/detokenize"):
        app.router.add_post(path, router.forward)
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    return app
