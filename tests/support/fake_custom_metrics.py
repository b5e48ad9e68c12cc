"""A minimal custom.metrics.k8s.io/v1beta2 aggregated API for tests (Pods metrics only), whose values a
test sets; registered with the real kube-apiserver so the real HPA controller acts on it.
"""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.wait import wait_until

GROUP, VERSION = "custom.metrics.k8s.io", "v1beta2"
GV = f"{GROUP}/{VERSION}"


class FakeCustomMetrics:
    def __init__(
        self,
        *,
        api_url,
        ca,
        cert,
        key,
        serving_cert,
        serving_key,
        metrics=("kubellm_num_requests_waiting",),
        host="127.0.0.1",
        port=0,
    ):
        self.metrics = set(metrics)
        self._values = {}  # (namespace, metric) -> float | callable(list[pod]) -> dict[pod, float]
        self.default = None  # value for namespaces the test did not set (None: no metrics)
        self._lock = threading.Lock()
        self._api_url = api_url
        self._client_ctx = ssl.create_default_context(cafile=ca)
        self._client_ctx.load_cert_chain(cert, key)
        srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        srv_ctx.load_cert_chain(serving_cert, serving_key)
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.socket = srv_ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]

    # --- test API ---------------------------------------------------------
    def set(self, namespace, metric, value):
        """value: a number (same for every pod) or fn(pod_names) -> {pod: number}."""
        with self._lock:
            self._values[(namespace, metric)] = value

    def start(self):
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- internals ----------------------------------------------------------
    def _running_pods(self, namespace, label_selector):
        q = urllib.parse.urlencode({"labelSelector": label_selector} if label_selector else {})
        url = f"{self._api_url}/api/v1/namespaces/{namespace}/pods?{q}"
        with urllib.request.urlopen(url, context=self._client_ctx, timeout=5) as r:
            items = json.load(r)["items"]
        return [
            p["metadata"]["name"]
            for p in items
            if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]

    def _items(self, namespace, metric, pods):
        with self._lock:
            v = self._values.get((namespace, metric), self.default)
        if v is None:
            return []
        per_pod = v(pods) if callable(v) else {p: v for p in pods}
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return [
            {
                "describedObject": {"kind": "Pod", "namespace": namespace, "name": p, "apiVersion": "/v1"},
                "metric": {"name": metric},
                "timestamp": now,
                "windowSeconds": 60,
                "value": f"{int(round(float(x) * 1000))}m",
            }
            for p, x in per_pod.items()
        ]

    def _handler_class(self):
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output quiet
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]  # "*" arrives as %2A
                qs = urllib.parse.parse_qs(u.query)
                if parts == ["apis"]:
                    return self._send(
                        200,
                        {
                            "kind": "APIGroupList",
                            "apiVersion": "v1",
                            "groups": [
                                {
                                    "name": GROUP,
                                    "versions": [{"groupVersion": GV, "version": VERSION}],
                                    "preferredVersion": {"groupVersion": GV, "version": VERSION},
                                }
                            ],
                        },
                    )
                if parts == ["apis", GROUP, VERSION]:
                    return self._send(
                        200,
                        {
                            "kind": "APIResourceList",
                            "apiVersion": "v1",
                            "groupVersion": GV,
                            "resources": [
                                {
                                    "name": f"pods/{m}",
                                    "singularName": "",
                                    "namespaced": True,
                                    "kind": "MetricValueList",
                                    "verbs": ["get"],
                                }
                                for m in sorted(outer.metrics)
                            ],
                        },
                    )
                # /apis/custom.metrics.k8s.io/v1beta2/namespaces/<ns>/pods/<name|*>/<metric>
                if (
                    len(parts) == 8
                    and parts[:4] == ["apis", GROUP, VERSION, "namespaces"]
                    and parts[5] == "pods"
                    and parts[7] in outer.metrics
                ):
                    ns, name, metric = parts[4], parts[6], parts[7]
                    try:
                        pods = outer._running_pods(ns, qs.get("labelSelector", [""])[0])
                    except Exception as e:  # surface as 503 so the HPA reports it
                        return self._send(
                            503,
                            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": str(e), "code": 503},
                        )
                    if name != "*":
                        pods = [p for p in pods if p == name]
                    return self._send(
                        200,
                        {
                            "kind": "MetricValueList",
                            "apiVersion": GV,
                            "metadata": {},
                            "items": outer._items(ns, metric, pods),
                        },
                    )
                return self._send(
                    404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
                )

        return H


SERVICE_NAME, SERVICE_NAMESPACE = "fake-custom-metrics", "kube-system"
APISERVICE = f"{VERSION}.{GROUP}"


def register(fake: FakeCustomMetrics, timeout: float = 60) -> None:
    """Point the aggregator at the fake server (ExternalName → 127.0.0.1) and wait until it is Available."""
    from kubernetes import client

    client.CoreV1Api().create_namespaced_service(
        SERVICE_NAMESPACE,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE_NAME},
            "spec": {"type": "ExternalName", "externalName": "127.0.0.1"},
        },
    )
    reg = client.ApiregistrationV1Api()
    reg.create_api_service(
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": APISERVICE},
            "spec": {
                "group": GROUP,
                "version": VERSION,
                "groupPriorityMinimum": 100,
                "versionPriority": 200,
                "insecureSkipTLSVerify": True,
                "service": {"name": SERVICE_NAME, "namespace": SERVICE_NAMESPACE, "port": fake.port},
            },
        }
    )
    conds: list = []

    def available() -> bool:
        conds[:] = reg.read_api_service(APISERVICE).status.conditions or []
        return any(c.type == "Available" and c.status == "True" for c in conds)

    try:
        wait_until(available, timeout=timeout, interval=0.5, what=f"APIService {APISERVICE} Available")
    except TimeoutError as e:
        raise TimeoutError(f"{e}; conditions: {conds}") from None


def unregister() -> None:
    """Remove the APIService first: an unavailable aggregated API stalls namespace deletion and the GC."""
    from kubernetes import client

    client.ApiregistrationV1Api().delete_api_service(APISERVICE)
    client.CoreV1Api().delete_namespaced_service(SERVICE_NAME, SERVICE_NAMESPACE)
