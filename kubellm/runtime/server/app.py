"""Assembles the HTTP server over the AsyncLLMEngine: lifespan, middleware, error handlers, probes and metrics, and
the OpenAI endpoints (one handler each in openai_*.py). Every refusal is an OpenAI-shaped error."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubellm.runtime.engine.async_engine import AsyncLLMEngine, EngineStartRefused, freeze_startup_heap
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.server.admission import ServerState
from kubellm.runtime.server.config import ServerConfig
from kubellm.runtime.server.errors import ApiError
from kubellm.runtime.server.metrics import ServerMetrics
from kubellm.runtime.server.openai_chat import ChatCompletions
from kubellm.runtime.server.openai_completions import Completions
from kubellm.runtime.server.openai_lora import LoraAdapters
from kubellm.runtime.server.openai_render import Render
from kubellm.runtime.server.openai_responses import Responses
from kubellm.runtime.server.openai_utility import Utility
from kubellm.runtime.server.serving import Serving
from kubellm.tracing import Tracing

log = logging.getLogger("kubellm.server")


class RequestIdMiddleware:
    """Accept X-Request-Id (or make one), keep it in request.state, and echo it on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(engine: AsyncLLMEngine, config: ServerConfig, tracing: Tracing | None = None) -> FastAPI:
    """The app over engine; tracing (kubellm/tracing.py), when given, makes a span per request and is flushed at
    shutdown."""
    if config.chat_template:
        engine.tokenizer.chat_template = config.chat_template
    state = ServerState()
    metrics = ServerMetrics(engine, config.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await engine.start()  # spawns the engine process and waits for the model
        except EngineStartRefused as e:  # serve.py ends the process with the reason (kubellm/fit.py)
            app.state.start_refused = e
            log.error(json.dumps({"event": "start_refused", "reason": e.reason, "message": str(e)}))
            raise
        warmup = SamplingParams(max_tokens=1, detokenize=False)
        async for _ in engine.generate(f"warmup-{uuid.uuid4().hex}", [0], warmup):
            pass
        freeze_startup_heap()  # the server's heap (the engine process froze its own)
        state.ready = True
        log.info(json.dumps({"event": "ready", "model": config.model_name, "max_model_len": engine.max_model_len}))
        yield
        engine.shutdown()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # the last batch of spans goes out

    # /docs, /redoc and /openapi.json describe every route to anyone: off unless --enable-api-docs
    docs = {} if config.enable_api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="kubellm", version="0.1.0", lifespan=lifespan, **docs)
    app.state.server_state = state
    app.state.engine = engine
    app.state.start_refused = None
    app.add_middleware(RequestIdMiddleware)
    if config.allowed_origins:  # outermost: preflight requests are answered before auth, as browsers need
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    add_error_handlers(app)
    add_operational_routes(app, engine, config, state, metrics)

    serving = Serving(engine, config, state, metrics, tracing)
    utility, completions, chat = Utility(serving), Completions(serving), ChatCompletions(serving)
    app.add_api_route("/v1/models", utility.list_models, methods=["GET"], response_model=None)
    app.add_api_route("/v1/completions", completions.create, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", chat.create, methods=["POST"], response_model=None)
    app.add_api_route("/v1/responses", Responses(serving).create, methods=["POST"], response_model=None)
    render = Render(chat, completions)  # vLLM's: the token ids a request would run (the llm-d router reads them)
    app.add_api_route("/v1/chat/completions/render", render.chat_completion, methods=["POST"], response_model=None)
    app.add_api_route("/v1/completions/render", render.completion, methods=["POST"], response_model=None)
    app.add_api_route("/tokenize", utility.tokenize, methods=["POST"], response_model=None)
    app.add_api_route("/detokenize", utility.detokenize, methods=["POST"], response_model=None)
    if config.enable_lora and config.allow_runtime_lora_updating:
        adapters = LoraAdapters(serving)
        app.add_api_route("/v1/load_lora_adapter", adapters.load, methods=["POST"], response_model=None)
        app.add_api_route("/v1/unload_lora_adapter", adapters.unload, methods=["POST"], response_model=None)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug, never the client's input
        log.exception("unhandled error")
        return ApiError(500, "internal server error", "server_error").response()


def add_operational_routes(
    app: FastAPI, engine: AsyncLLMEngine, config: ServerConfig, state: ServerState, metrics: ServerMetrics
) -> None:
    """Kubernetes' probes and Prometheus' scrape: no API key, never refused by admission."""

    @app.get("/health")
    async def health():
        if not engine.alive:
            return ApiError(503, f"engine loop is not running: {engine.error!r}", "service_unavailable").response()
        silent = engine.silent_for()
        if silent > config.engine_stall_timeout_s:
            return ApiError(
                503, f"the engine has not reported for {silent:.0f} s (stuck)", "service_unavailable"
            ).response()
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return ApiError(503, "draining", "service_unavailable").response()
        if not state.ready or not engine.alive:
            return ApiError(503, "not ready", "service_unavailable").response()
        return {"status": "ready", "model": config.model_name}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
