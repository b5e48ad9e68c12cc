"""`kubellm operator`: run the kopf operator (all namespaces or a list), with a liveness endpoint, optional
peering for HA, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

import kopf
from prometheus_client import start_http_server


def run_operator(
    namespaces: list[str], liveness: str | None, peering: str | None, priority: int, metrics_port: int | None
) -> int:
    import kubellm.operator.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(
        level=logging.INFO,
        format='{"ts": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "msg": %(message)r}',
    )
    # kopf logs every handler run at INFO (a timer per object every 2 s): keep its per-object chatter out
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if metrics_port:
        start_http_server(metrics_port)
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
