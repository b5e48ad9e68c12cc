"""OpenTelemetry tracing end to end: a real `kubellm router` in front of a real `kubellm serve`, both exporting
over OTLP/HTTP to a real receiver (tests/support/otlp.py decodes the protobuf ExportTraceServiceRequest). The
router's span and the pod's span are one trace, the pod's span the child of the router's, the router's the child
of the client's `traceparent`; with no endpoint configured nothing is sent at all."""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from kubellm.runtime.process import free_port
from tests.support.otlp import OtlpReceiver
from tests.support.router import RouterProcess
from tests.support.server import ServerProcess
from tests.support.wait import wait_until

OTEL_ENV = (
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: spans leave each process soon after they end
    return monkeypatch


@pytest.fixture
def stopped():
    """Processes and receivers to stop at the end, whatever happens."""
    things = []
    yield things
    for t in reversed(things):
        t.stop()


def _runtime_logs(server: ServerProcess) -> list[dict]:
    return [json.loads(x) for x in server.logs().splitlines() if x.startswith("{")]


@pytest.fixture(scope="module")
def traced_pod(tiny_model):
    """A `kubellm serve` exporting its spans to a receiver of its own: the flag, given without a path (OTLP/HTTP's
    /v1/traces is added)."""
    receiver = OtlpReceiver()
    args = ("--served-model-name", "tiny-t", "--max-model-len", "256", "--otlp-traces-endpoint", receiver.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        for name in OTEL_ENV:
            mp.delenv(name, raising=False)
        server = ServerProcess(tiny_model, *args)
    try:
        yield server.wait_ready(), receiver
    finally:
        server.stop()
        receiver.stop()


def test_router_and_pod_spans_make_one_trace(traced_pod, tmp_path, clean_env, stopped):
    server, receiver = traced_pod
    # the router: the standard variables
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url + "/v1/traces")
    clean_env.setenv("OTEL_SERVICE_NAME", "edge-router")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens; sorts before the live pod: least-load tries it first
    live = f"http://localhost:{server.port}"
    router = RouterProcess(str(tmp_path / "routes.json"), {"tiny-t": [dead, live]}, "--policy", "least-load")
    stopped.append(router)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="sk-any", max_retries=0)

    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    chat = client.chat.completions.create(
        model="tiny-t",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    stream = client.completions.create(
        model="tiny-t", prompt="once upon", max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    streamed_usage = [c.usage for c in stream if c.usage][0]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])

    def all_spans():  # the router's 3, and the pod's for the 2 it answered
        routed, pods = receiver.received("edge-router"), receiver.received("kubellm-serve")
        answered = {s.trace_id for s in routed if s.attributes.get("http.response.status_code") == 200}
        return (routed, pods) if len(routed) == 3 and answered <= {s.trace_id for s in pods} else None

    routed, pods = wait_until(all_spans, timeout=60, what="3 router spans and 2 pod spans at the receiver")
    assert all(s.kind == "SERVER" for s in routed + pods)

    # 1. the client's trace: client span → router span → pod span
    (r1,) = [s for s in routed if s.trace_id == trace_id]
    (p1,) = [s for s in pods if s.trace_id == trace_id]
    assert r1.parent_span_id == client_span and p1.parent_span_id == r1.span_id
    assert r1.name == "POST /v1/chat/completions" and p1.name == "llm_request"
    assert r1.attributes["gen_ai.request.model"] == "tiny-t" and r1.attributes["kubellm.router.pod"] == live
    assert r1.attributes["http.response.status_code"] == 200 and not r1.error
    assert r1.attributes["kubellm.router.attempts"] == 2 and r1.attributes["kubellm.router.retries"] == 1  # dead pod
    a = p1.attributes
    assert a["gen_ai.response.model"] == "tiny-t"
    assert a["gen_ai.usage.prompt_tokens"] == chat.usage.prompt_tokens
    assert a["gen_ai.usage.completion_tokens"] == chat.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [chat.choices[0].finish_reason]
    assert 0 < a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert a["gen_ai.request.max_tokens"] == 5 and not p1.error
    assert r1.start_ns <= p1.start_ns <= p1.end_ns <= r1.end_ns  # the pod's work inside the router's
    # the trace id the logs carry is the trace's
    assert trace_id in {x.get("trace_id") for x in router.request_logs()}
    assert trace_id in {x.get("trace_id") for x in _runtime_logs(server)}

    # 2. no traceparent from the client: the router's span starts the trace, the pod's continues it
    (r2,) = [s for s in routed if s.name == "POST /v1/completions"]
    (p2,) = [s for s in pods if s.trace_id == r2.trace_id]
    assert r2.parent_span_id == "" and p2.parent_span_id == r2.span_id
    assert r2.attributes["kubellm.router.retries"] == 0  # the dead pod is skipped for a while after it refused
    assert p2.attributes["gen_ai.usage.completion_tokens"] == streamed_usage.completion_tokens

    # 3. an unknown model: the router's span says 404; no pod saw it
    (r3,) = [s for s in routed if s.attributes["http.response.status_code"] == 404]
    assert "kubellm.router.pod" not in r3.attributes and not [s for s in pods if s.trace_id == r3.trace_id]


def _default_port_receiver() -> OtlpReceiver:
    """The receiver on the SDK's default OTLP/HTTP address when it is free: where a stray default would send."""
    try:
        return OtlpReceiver(port=4318)
    except OSError:  # taken by another process
        return OtlpReceiver()


def test_nothing_is_sent_without_an_endpoint(tiny_model, tmp_path, clean_env, stopped):
    receiver = _default_port_receiver()
    stopped.append(receiver)
    server = ServerProcess(tiny_model, "--served-model-name", "tiny-u", "--max-model-len", "256")
    stopped.append(server)
    server.wait_ready()
    router = RouterProcess(str(tmp_path / "routes.json"), {"tiny-u": [server.url]})
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="sk-any", max_retries=0)
    trace_id = uuid.uuid4().hex
    client.chat.completions.create(
        model="tiny-u",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
        extra_headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
    )
    router.stop()  # a tracing process sends what it still holds when it stops: after this, anything is at the receiver
    server.stop()
    stopped.remove(server)
    assert receiver.posts == [] and receiver.received() == []
    # the trace context still travels (and is logged) without tracing
    assert trace_id in {x.get("trace_id") for x in router.request_logs()}
    assert trace_id in {x.get("trace_id") for x in _runtime_logs(server)}


def test_a_tracing_pod_behind_a_router_that_does_not_trace(traced_pod, tmp_path, clean_env, stopped):
    """The router makes the trace id (sampled) without exporting anything: the pod's span is in that trace, the
    one the router's log names."""
    server, receiver = traced_pod
    router = RouterProcess(str(tmp_path / "routes.json"), {"tiny-t": [server.url]})
    stopped.append(router)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="sk-any", max_retries=0)
    client.completions.create(model="tiny-t", prompt="a pod that traces alone", max_tokens=2)
    (logged,) = [x["trace_id"] for x in router.request_logs()]
    (span,) = wait_until(lambda: [s for s in receiver.received() if s.trace_id == logged], timeout=60, what="its span")
    assert span.service == "kubellm-serve" and span.name == "llm_request"
    assert not receiver.received("kubellm-router")  # the router sent nothing
