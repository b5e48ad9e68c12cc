"""`kubellm router`: build the discovery source and the router from the command line, log JSON, serve (the
flags import nothing heavy: `kubellm --help` stays fast)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys

from kubellm.router.policy import POLICIES, Limits


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a message that is itself a JSON object is merged in (the per-request lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        msg = record.getMessage()
        try:
            fields = json.loads(msg) if msg.startswith("{") else None
        except ValueError:
            fields = None
        line.update(fields if isinstance(fields, dict) else {"msg": msg})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--namespace", help="route to the InferenceServices of this namespace (default: the pod's own)")
    src.add_argument("--all-namespaces", action="store_true", help="route to every namespace's InferenceServices")
    src.add_argument(
        "--endpoints-file", help="static routes instead of the Kubernetes API (JSON/YAML, re-read on change)"
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--policy", choices=sorted(POLICIES), default="prefix", help="pod choice (kubellm/router/policy.py)")
    p.add_argument("--prefix-chars", type=int, default=256, help="leading prompt characters hashed for affinity")
    p.add_argument("--max-waiting-per-pod", type=float, default=16, help="a pod with this many queued is saturated")
    p.add_argument(
        "--max-in-flight-per-pod", type=int, default=256, help="open requests per pod before it is saturated"
    )
    p.add_argument("--max-held-requests", type=int, default=64, help="per model with no Ready pod; beyond: 429")
    p.add_argument("--hold-timeout-s", type=float, default=300, help="how long a held request waits; then 503")
    p.add_argument(
        "--adapter-wait-s",
        type=float,
        default=30,
        help="how long a request for a declared LoRA adapter waits for a Ready pod to hold it; then 503",
    )
    p.add_argument("--max-attempts", type=int, default=3, help="pods tried per request before the first byte")
    p.add_argument(
        "--upstream-read-timeout-s", type=float, default=600, help="silence from a pod that ends a request (s)"
    )
    p.add_argument("--refresh-s", type=float, default=1.0, help="discovery period")
    p.add_argument("--scrape-s", type=float, default=0.5, help="pod /metrics period")
    p.add_argument(
        "--otlp-traces-endpoint",
        help="OTLP/HTTP URL for a span per request (e.g. http://collector:4318); default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else none (tracing off)",
    )


def config_from(args: argparse.Namespace):
    from kubellm.router.app import RouterConfig

    return RouterConfig(
        policy=args.policy,
        prefix_chars=args.prefix_chars,
        refresh_seconds=args.refresh_s,
        scrape_seconds=args.scrape_s,
        max_attempts=args.max_attempts,
        read_timeout=args.upstream_read_timeout_s,
        max_held_requests=args.max_held_requests,
        hold_seconds=args.hold_timeout_s,
        adapter_wait_seconds=args.adapter_wait_s,
        limits=Limits(max_waiting=args.max_waiting_per_pod, max_in_flight=args.max_in_flight_per_pod),
    )


def discovery_from(args: argparse.Namespace):
    from kubellm.router.discovery import KubernetesDiscovery, StaticDiscovery

    if args.endpoints_file:
        return StaticDiscovery(args.endpoints_file)
    if args.all_namespaces:
        return KubernetesDiscovery(None)
    from kubellm.operator.render import SA_NAMESPACE_FILE

    namespace = args.namespace
    if not namespace:
        with open(SA_NAMESPACE_FILE) as f:
            namespace = f.read().strip()
    return KubernetesDiscovery(namespace)


def run_router(args: argparse.Namespace) -> int:
    from aiohttp import web

    from kubellm.router.app import Router, create_app

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    from kubellm.tracing import TracingConfigError, make_tracing

    try:
        tracing = make_tracing(args.otlp_traces_endpoint, "kubellm-router")
    except TracingConfigError as e:
        print(f"kubellm router: {e}", file=sys.stderr)
        return 2
    router = Router(discovery_from(args), config_from(args), tracing=tracing)
    web.run_app(create_app(router), host=args.host, port=args.port, access_log=None, print=None)
    return 0
