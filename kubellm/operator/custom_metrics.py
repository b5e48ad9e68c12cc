"""The operator serves `custom.metrics.k8s.io/v1beta2` itself (an install option: the chart's
`metricsApi.enabled`): the HPAs it renders read `kubellm_num_requests_waiting` per pod, and this answers with
the value each runtime pod reports on its own `/metrics` right now — no Prometheus stack just for autoscaling.

Clusters that already run prometheus-adapter can keep it (manifests/monitoring/prometheus-adapter-rules.yaml):
only one APIService may own `v1beta2.custom.metrics.k8s.io`, so install one or the other — whichever
APIService object was applied last is the one the aggregator uses.

Scope: Pods metrics of runtime pods (the ones the operator labels), read over plain HTTP from the pod IP on
its API port at request time, a few at a time. The API is served over TLS (certificate from the chart's Secret);
the aggregator's client certificate is not verified (the values are queue depths, and the operator's
NetworkPolicy can restrict who reaches the port).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import ssl
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GROUP, VERSION = "custom.metrics.k8s.io", "v1beta2"
GV = f"{GROUP}/{VERSION}"
METRICS = ("kubellm_num_requests_waiting", "kubellm_num_requests_running", "kubellm_kv_cache_usage_ratio")
RUNTIME_PORT = 8000
log = logging.getLogger(__name__)


def parse_metric(text: str, name: str) -> float | None:
    """Sum of a metric's samples in Prometheus text format (one per model_name label here); None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                continue
    return total if seen else None


class CustomMetricsAPI:
    def __init__(self, port: int, cert_file: str, key_file: str, scrape_timeout: float = 2.0):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.core = client.CoreV1Api()
        self.scrape_timeout = scrape_timeout
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="scrape")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        self.httpd = ThreadingHTTPServer(("0.0.0.0", port), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)

    def start(self) -> CustomMetricsAPI:
        threading.Thread(target=self.httpd.serve_forever, name="custom-metrics", daemon=True).start()
        log.info(f"serving {GV} on :{self.httpd.server_address[1]}")
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.pool.shutdown(wait=False)

    # ---------------------------------------------------------------- values
    def _scrape(self, ip: str, metric: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://{ip}:{RUNTIME_PORT}/metrics", timeout=self.scrape_timeout) as r:
                return parse_metric(r.read().decode(errors="replace"), metric)
        except OSError:
            return None  # a pod not answering has no value (the HPA then treats it conservatively)

    def items(self, namespace: str, name: str, metric: str, selector: str) -> list[dict]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector or None).items
        pods = [
            p
            for p in pods
            if p.status.phase == "Running"
            and p.status.pod_ip
            and not p.metadata.deletion_timestamp
            and (name == "*" or p.metadata.name == name)
            and "kubellm.io/inferenceservice" in (p.metadata.labels or {})
        ]
        values = list(self.pool.map(lambda p: self._scrape(p.status.pod_ip, metric), pods))
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return [
            {
                "describedObject": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": p.metadata.name,
                    "apiVersion": "/v1",
                },
                "metric": {"name": metric},
                "timestamp": now,
                "windowSeconds": 1,
                "value": f"{int(round(v * 1000))}m",
            }
            for p, v in zip(pods, values)
            if v is not None
        ]

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # the aggregator polls discovery every few seconds
                pass

            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _status(self, code: int, message: str, reason: str = "") -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def do_GET(self):  # noqa: N802 (http.server's name)
                u = urllib.parse.urlsplit(self.path)
                parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
                qs = urllib.parse.parse_qs(u.query)
                if parts in (["healthz"], ["readyz"], ["livez"]):
                    return self._send(200, {"status": "ok"})
                if parts == ["apis"]:
                    group = {
                        "name": GROUP,
                        "versions": [{"groupVersion": GV, "version": VERSION}],
                        "preferredVersion": {"groupVersion": GV, "version": VERSION},
                    }
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]})
                if parts == ["apis", GROUP, VERSION]:
                    resources = [
                        {
                            "name": f"pods/{m}",
                            "singularName": "",
                            "namespaced": True,
                            "kind": "MetricValueList",
                            "verbs": ["get"],
                        }
                        for m in METRICS
                    ]
                    return self._send(
                        200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GV, "resources": resources}
                    )
                # /apis/custom.metrics.k8s.io/v1beta2/namespaces/<ns>/pods/<name|*>/<metric>
                if (
                    len(parts) == 8
                    and parts[:4] == ["apis", GROUP, VERSION, "namespaces"]
                    and parts[5] == "pods"
                    and parts[7] in METRICS
                ):
                    try:
                        items = api.items(parts[4], parts[6], parts[7], qs.get("labelSelector", [""])[0])
                    except Exception as e:  # the HPA reports it as FailedGetPodsMetric
                        log.warning(f"custom metrics for {parts[4]}: {e!r}")
                        return self._status(503, str(e), "ServiceUnavailable")
                    return self._send(
                        200, {"kind": "MetricValueList", "apiVersion": GV, "metadata": {}, "items": items}
                    )
                return self._status(404, f"{u.path} not found", "NotFound")

        return Handler


def from_env() -> CustomMetricsAPI | None:
    """Started by the operator when KUBELLM_CUSTOM_METRICS_PORT is set (the chart does it with metricsApi.enabled);
    the TLS certificate and key are read from KUBELLM_CUSTOM_METRICS_CERT_DIR (tls.crt, tls.key)."""
    port = os.environ.get("KUBELLM_CUSTOM_METRICS_PORT")
    if not port:
        return None
    cert_dir = os.environ.get("KUBELLM_CUSTOM_METRICS_CERT_DIR", "/var/run/kubellm/custom-metrics-tls")
    return CustomMetricsAPI(int(port), f"{cert_dir}/tls.crt", f"{cert_dir}/tls.key").start()
