"""`kubellm operator`: run the kopf operator (all namespaces or a list), with a liveness endpoint, optional
peering for HA, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import time

import kopf
from prometheus_client import start_http_server


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the InferenceService a line is about
    (`namespace`, `name`: from our `extra={"isvc": "ns/name"}` or from kopf's per-object loggers)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None) or {}
        isvc = getattr(record, "isvc", None) or (
            f"{ref.get('namespace')}/{ref.get('name')}" if ref.get("kind") == "InferenceService" else None
        )
        if isvc:
            line["namespace"], _, line["name"] = isvc.partition("/")
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    # kopf logs every handler run at INFO (a timer per object every 2 s): keep its per-object chatter out
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def seniority_priority() -> int:
    """A kopf peering priority that falls with the start time, so the oldest replica acts and one that starts
    later (a replacement after a crash, a new pod in a rollout) stands by instead of taking over from a working
    one. Replicas of a Deployment share their arguments and kopf pauses every operator sharing the highest
    priority, so each draws its own; the random part separates replicas started in the same millisecond.
    Negative: an operator run by hand with kopf's default 0 (or any `--priority`) still pauses the deployed ones."""
    return -(time.time_ns() // 1_000_000 * 1000 + random.SystemRandom().randrange(1000))


def run_operator(
    namespaces: list[str], liveness: str | None, peering: str | None, priority: int, metrics_port: int | None
) -> int:
    import kubellm.operator.handlers  # noqa: F401  (registers the handlers)

    configure_logging()
    if peering is not None and not priority:
        priority = seniority_priority()
        logging.getLogger(__name__).info(f"peering {peering!r}: priority {priority}")
    if metrics_port:
        start_http_server(metrics_port)
    from kubellm.operator.custom_metrics import from_env

    from_env()  # custom.metrics.k8s.io for the HPAs, when installed with it (the chart's metricsApi.enabled)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            standalone=peering is None,
            peering_name=peering,
            priority=priority,
        )
    )
    return 0
