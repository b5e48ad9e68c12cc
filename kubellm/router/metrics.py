"""The router's own Prometheus metrics (`kubellm_router_*`, at the router's GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics


class RouterMetrics:
    def __init__(self):
        disable_created_metrics()  # the router's own process: *_created series only double the page
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubellm_router_requests", "Requests answered, by model and HTTP status.", ["model", "code"], registry=r
        )
        self.attempts = Counter(
            "kubellm_router_attempts",
            "Tries to reach a pod: ok, connect_error or upstream_503 (retried on another pod), broken_stream.",
            ["model", "outcome"],
            registry=r,
        )
        self.routed = Counter(
            "kubellm_router_routed",
            "Requests sent to the prompt's own pod on the hash ring (affinity) or to another (spill).",
            ["model", "choice"],
            registry=r,
        )
        self.rejected = Counter(
            "kubellm_router_rejected",
            "Requests refused by the router: saturated, held_full, hold_timeout.",
            ["model", "reason"],
            registry=r,
        )
        self.held = Gauge(
            "kubellm_router_held_requests", "Requests waiting for a model's first Ready pod.", ["model"], registry=r
        )
        self.in_flight = Gauge("kubellm_router_in_flight_requests", "Requests open at a pod.", ["model"], registry=r)
        self.endpoints = Gauge("kubellm_router_endpoints", "Ready pods per model.", ["model"], registry=r)
        self.replicas = Gauge(
            "kubellm_router_desired_replicas",
            "Replicas the model's Deployment asks for (from its InferenceService's status; 0: scaled to zero).",
            ["model"],
            registry=r,
        )
        self.scaled = Counter(
            "kubellm_router_scale_events",
            "Scale asks: to 1 (from zero) or to 0 (idle).",
            ["model", "replicas"],
            registry=r,
        )
