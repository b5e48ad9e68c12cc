"""OpenTelemetry tracing for `kubellm router` and `kubellm serve`: spans exported over OTLP/HTTP (protobuf), off
unless an endpoint is configured — `--otlp-traces-endpoint` (vLLM's flag), else the standard
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_SERVICE_NAME names the service.

The OpenTelemetry SDK (the `otel` extra) is imported only when tracing is on: without an endpoint nothing is
imported, nothing is sent, and the W3C `traceparent` is still passed along as it came. The engine never sees any
of this: the server makes its spans from the outputs the engine returns."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from urllib.parse import urlsplit

TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for traces (a collector's port 4318)
PROTOCOLS = ("http/protobuf",)  # the one exporter shipped: no gRPC stack in the images


class TracingConfigError(ValueError):
    """The tracing settings name something this build cannot do (the message says what)."""


def traces_endpoint(flag: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where spans go, or None (tracing off). A flag or generic endpoint without a path gets OTLP/HTTP's
    /v1/traces, as the OpenTelemetry SDKs do for OTEL_EXPORTER_OTLP_ENDPOINT; the traces-specific variable is used
    as given. OTEL_SDK_DISABLED=true turns it off whatever is set."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if flag:
        return _with_traces_path(flag)
    if environ.get(TRACES_ENDPOINT_ENV):
        return environ[TRACES_ENDPOINT_ENV]
    if environ.get(ENDPOINT_ENV):
        return _with_traces_path(environ[ENDPOINT_ENV])
    return None


def _with_traces_path(url: str) -> str:
    if "://" not in url:
        url = "http://" + url  # host:port, as vLLM's gRPC-style flag is often written
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TracingConfigError(f"otlp_traces_endpoint must be an http(s) URL (OTLP/HTTP), got {url!r}")
    return url if parts.path not in ("", "/") else url.rstrip("/") + TRACES_PATH


def _check_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name)
        if value:
            if value not in PROTOCOLS:
                raise TracingConfigError(f"{name}={value!r}: kubellm exports traces over OTLP/HTTP (http/protobuf)")
            return


def make_tracing(flag: str | None, service_name: str, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """A Tracing when an endpoint is configured, else None (and the SDK is never imported)."""
    endpoint = traces_endpoint(flag, environ)
    if endpoint is None:
        return None
    _check_protocol(environ)
    try:
        return Tracing(endpoint, environ.get("OTEL_SERVICE_NAME") or service_name)
    except ImportError as e:
        raise TracingConfigError(
            f"an OTLP traces endpoint is set ({endpoint}) but the OpenTelemetry SDK is not installed "
            f"(pip install 'kubellm[otel]'): {e}"
        ) from None


class Tracing:
    """A tracer whose spans are batched to an OTLP/HTTP endpoint, and W3C trace-context in and out of headers."""

    def __init__(self, endpoint: str, service_name: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.endpoint, self.service_name = endpoint, service_name
        # a provider of our own, not the global one: nothing else in the process is changed by it
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("kubellm")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = set_span_in_context
        self.SERVER, self.error = SpanKind.SERVER, (lambda msg: Status(StatusCode.ERROR, msg))

    def start_server_span(self, name: str, headers: Mapping[str, str], start_time_ns: int | None = None):
        """A SERVER span continuing the trace of the request's `traceparent` (a new trace without one)."""
        parent = self._propagator.extract(_LowerCase(headers))
        return self.tracer.start_span(name, context=parent, kind=self.SERVER, start_time=start_time_ns)

    def inject(self, span, headers: MutableMapping[str, str]) -> None:
        """Set `traceparent` (and `tracestate`) in headers to span's context: the next hop's parent is span."""
        for name in [k for k in headers if k.lower() in ("traceparent", "tracestate")]:
            del headers[name]
        self._propagator.inject(headers, context=self._in_context(span))

    def end(self, span, attributes: Mapping, error: str | None = None, end_time_ns: int | None = None) -> None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            span.set_status(self.error(error))
        span.end(end_time=end_time_ns)

    def shutdown(self) -> None:
        """Send what is still batched, then stop."""
        self.provider.shutdown()


class _LowerCase(Mapping):
    """Header lookup by lower-case name (the W3C propagator asks for `traceparent`)."""

    def __init__(self, headers: Mapping[str, str]):
        self._h = {k.lower(): v for k, v in headers.items()}

    def __getitem__(self, key: str) -> str:
        return self._h[key.lower()]

    def __iter__(self):
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)
