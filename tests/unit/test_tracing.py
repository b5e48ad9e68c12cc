"""kubellm/tracing.py's settings: where spans go (the flag over the standard variables), off by default with the
OpenTelemetry SDK never imported, and clear refusals for what this build cannot do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kubellm.tracing import TracingConfigError, make_tracing, traces_endpoint


def test_off_unless_an_endpoint_is_configured():
    assert traces_endpoint(None, {}) is None
    assert make_tracing(None, "kubellm-serve", {}) is None
    assert traces_endpoint(None, {"OTEL_SERVICE_NAME": "x"}) is None  # a name alone turns nothing on


def test_the_flag_wins_over_the_standard_variables_and_gets_the_traces_path():
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env:4318/v1/traces"}
    assert traces_endpoint("http://collector:4318", env) == "http://collector:4318/v1/traces"
    assert traces_endpoint("collector.monitoring:4318", {}) == "http://collector.monitoring:4318/v1/traces"
    assert traces_endpoint("https://otlp.example.com/custom/path", {}) == "https://otlp.example.com/custom/path"
    # the traces variable as given; the generic one gets /v1/traces (the OpenTelemetry SDKs' rule)
    assert traces_endpoint(None, env) == "http://env:4318/v1/traces"
    assert traces_endpoint(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://gen:4318/"}) == "http://gen:4318/v1/traces"
    assert traces_endpoint("http://collector:4318", {"OTEL_SDK_DISABLED": "true"}) is None


def test_what_cannot_be_exported_is_refused_by_name():
    with pytest.raises(TracingConfigError, match="http"):
        traces_endpoint("ftp://collector:21", {})
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='grpc'"):
        make_tracing("http://collector:4318", "x", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})


def test_service_name_from_the_standard_variable():
    tracing = make_tracing("http://127.0.0.1:9/v1/traces", "kubellm-serve", {"OTEL_SERVICE_NAME": "chat-pods"})
    try:
        assert tracing.service_name == "chat-pods" and tracing.endpoint == "http://127.0.0.1:9/v1/traces"
    finally:
        tracing.provider.shutdown()  # nothing was made: no export is attempted


def _sdk_loaded_after(code: str) -> bool:
    check = (
        f"import sys, kubellm.cli, kubellm.router.app, kubellm.runtime.server.app, kubellm.tracing as t\n{code}\n"
        "print(any(m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter', 'google.protobuf')) "
        "for m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip() == "True"


def test_no_sdk_import_cost_when_off():
    assert not _sdk_loaded_after("assert t.make_tracing(None, 'x', {}) is None")
    # and the check sees the SDK when tracing is on
    assert _sdk_loaded_after("t.make_tracing('http://127.0.0.1:9', 'x', {}).provider.shutdown()")
