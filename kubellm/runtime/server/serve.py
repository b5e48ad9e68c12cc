"""`kubellm serve`: load the model, then run uvicorn; SIGTERM drains (503 to new requests, in-flight ones
finish up to the drain timeout) and exits 0. A second SIGTERM exits at once."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import uvicorn

from kubellm import fit
from kubellm.runtime.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kubellm.runtime.engine.core import EngineCore
from kubellm.runtime.process import exit_process
from kubellm.runtime.server.app import create_app
from kubellm.runtime.server.config import ServerConfig
from kubellm.runtime.server.http_limits import HttpLimits, LimitedHttpToolsProtocol
from kubellm.settings import EngineConfig
from kubellm.tracing import TracingConfigError, make_tracing

log = logging.getLogger("kubellm.server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages that are already JSON objects are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        msg = record.getMessage()
        try:
            parsed = json.loads(msg)
        except ValueError:
            parsed = None
        entry.update(parsed if isinstance(parsed, dict) else {"msg": msg})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, drain_timeout_s: float):
        super().__init__(config)
        self.app_ref = app
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        state = self.app_ref.state.server_state
        if state.draining:  # second signal: stop now
            return super().handle_exit(sig, frame)
        state.draining = True
        log.info(json.dumps({"event": "draining", "in_flight": state.in_flight, "timeout_s": self.drain_timeout_s}))
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        state = self.app_ref.state.server_state
        deadline = time.monotonic() + self.drain_timeout_s
        while state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight:  # past the deadline: each request left ends with a clean 503 (in-band if streaming)
            log.info(json.dumps({"event": "drain_deadline", "unfinished": state.in_flight}))
            self.app_ref.state.engine.end_all(EngineDeadError("the server is shutting down (drain deadline passed)"))
            grace = time.monotonic() + 5
            while state.in_flight > 0 and time.monotonic() < grace:
                await asyncio.sleep(0.05)
        log.info(json.dumps({"event": "drained", "unfinished": state.in_flight}))
        self.should_exit = True
        if state.in_flight:  # still there: uvicorn closes the remaining connections
            self.force_exit = True


def serve(config: ServerConfig, make_core: Callable[[EngineConfig], EngineCore] = EngineCore) -> NoReturn:
    """Serve until drained, then end the process (exit code 0). make_core builds the engine core in the engine
    process (bench/stand_in.py passes an emulated device)."""
    # Detokenization batches here are one step's new tokens. The Rust tokenizer's thread pool would be sized
    # by the node's cores, not the pod's CPU limit, and contends with the event loop: under load a token
    # cost 10.9 µs of wall time with it, 2.2 µs without (2-core VM, 256 streams)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    engine_config = EngineConfig(
        served_model_name=config.model_name,
        queue_timeout_s=2 * config.max_queue_time_s if config.max_queue_time_s else None,
        **config.engine_options(),
    )
    try:
        tracing = make_tracing(config.otlp_traces_endpoint, "kubellm-serve")
    except TracingConfigError as e:
        log.error(json.dumps({"event": "bad_settings", "message": str(e)}))
        exit_process(2)
    engine = AsyncLLMEngine(engine_config, make_core)
    app = create_app(engine, config, tracing)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        # httptools with limits on the head (size, header count, deadline): http_limits.py
        http=LimitedHttpToolsProtocol.with_limits(
            HttpLimits(config.max_header_bytes, config.max_headers, config.header_timeout_s)
        ),
        timeout_keep_alive=config.keep_alive_timeout_s,
        # the client address (rate limits, logs) from X-Forwarded-For only behind proxies named by the operator
        proxy_headers=bool(config.forwarded_allow_ips),
        forwarded_allow_ips=config.forwarded_allow_ips or None,
        timeout_graceful_shutdown=max(config.drain_timeout_s, 1.0),
    )
    try:
        DrainingServer(uv_config, app, config.drain_timeout_s).run()  # the engine process is stopped when it returns
    except SystemExit:  # uvicorn's exit when the lifespan's start-up failed
        if app.state.start_refused is None:
            raise
    refused = app.state.start_refused
    if refused is not None:  # e.g. the model does not fit: the reason where Kubernetes shows it, a distinct code
        fit.write_termination_message(refused.termination_message)
        exit_process(fit.EXIT_CODE)
    exit_process(0)
