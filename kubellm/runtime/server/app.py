"""The HTTP server: OpenAI-compatible endpoints over the AsyncLLMEngine, with API keys, rate limits, load
shedding, Prometheus metrics, request logs and graceful drain. Every refusal is an OpenAI-shaped error.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubellm.runtime.engine.async_engine import AsyncLLMEngine, EngineDeadError, freeze_startup_heap
from kubellm.runtime.engine.guided import Grammars, grammar_for
from kubellm.runtime.engine.output import RequestOutput
from kubellm.runtime.engine.wire import TokenLogprob
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.config import ServerConfig
from kubellm.runtime.server.limits import ApiKeys, RateLimiter
from kubellm.runtime.server.metrics import ServerMetrics

log = logging.getLogger("kubellm.server")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers

    def response(self) -> JSONResponse:
        body = p.ErrorResponse(
            error=p.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status)
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


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


class ServerState:
    def __init__(self):
        self.ready = False
        self.draining = False
        self.in_flight = 0


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def create_app(engine: AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    tokenizer = engine.tokenizer
    if config.chat_template:
        tokenizer.chat_template = config.chat_template
    model_name = config.model_name
    state = ServerState()
    metrics = ServerMetrics(engine, model_name)
    keys = ApiKeys(config.api_keys, config.api_key_file)
    limiter = RateLimiter(config.rate_limit_rpm, config.rate_limit_burst)
    created = int(time.time())
    token_text: dict[int, str] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()  # spawns the engine process and waits for the model
        warmup = SamplingParams(max_tokens=1, detokenize=False)
        async for _ in engine.generate(f"warmup-{uuid.uuid4().hex}", [0], warmup):
            pass
        freeze_startup_heap()  # the server's heap (the engine process froze its own)
        state.ready = True
        log.info(json.dumps({"event": "ready", "model": model_name, "max_model_len": engine.max_model_len}))
        yield
        engine.shutdown()

    app = FastAPI(title="kubellm", version="0.1.0", lifespan=lifespan)
    app.state.server_state = state
    app.state.engine = engine
    app.add_middleware(RequestIdMiddleware)
    if config.allowed_origins:  # outermost: preflight requests are answered before auth, as browsers need
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )

    # ------------------------------------------------------------------ errors
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

    # ------------------------------------------------------------------ admission
    def authorize(request: Request) -> str | None:
        """The presented API key (None: none presented and none needed); 401 unless it is valid."""
        header = request.headers.get("authorization", "")
        presented = header[7:].strip() if header.lower().startswith("bearer ") else None
        if not keys.check(presented):
            metrics.rejected.labels("unauthorized").inc()
            raise ApiError(
                401, "missing or invalid API key", "authentication_error", headers={"WWW-Authenticate": "Bearer"}
            )
        return presented

    async def admit(request: Request, model_cls: type[BaseModel], shed_load: bool = True):
        """Auth → availability → rate limit → body → schema → model → load (for requests that queue in the
        engine: shed_load). Raises ApiError on refusal."""
        presented = authorize(request)
        if state.draining or not state.ready or not engine.alive:
            metrics.rejected.labels("unavailable").inc()
            raise ApiError(
                503,
                "the server is draining" if state.draining else "the server is not ready",
                "service_unavailable",
                headers=_retry_after(5),
            )
        caller = presented or (request.client.host if request.client else "anonymous")
        wait = limiter.acquire(caller)
        if wait is not None:
            metrics.rejected.labels("rate_limited").inc()
            raise ApiError(429, "rate limit exceeded", "rate_limit_error", headers=_retry_after(wait))
        body = bytearray()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"request body larger than {config.max_body_bytes} bytes")
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"request body larger than {config.max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            req = model_cls.model_validate(payload)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or None
            msg = err["msg"].removeprefix("Value error, ")
            raise ApiError(400, f"{loc}: {msg}" if loc else msg, param=loc) from None
        unsupported = p.unsupported_field(req)
        if unsupported:
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist.", "not_found_error", param="model")
        if not shed_load:
            return req
        if engine.num_waiting >= config.max_waiting_requests:
            metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, "too many requests are waiting; retry later", "overloaded", headers=_retry_after(2))
        age = engine.oldest_waiting_age()
        if config.max_queue_time_s is not None and age > config.max_queue_time_s:
            metrics.rejected.labels("queue_time").inc()
            raise ApiError(429, "the queue is too slow right now; retry later", "overloaded", headers=_retry_after(age))
        return req

    grammars: list[Grammars] = []  # built on first use: the engine's vocabulary size is known once it runs

    def grammar(name: str, kind: str, spec) -> str:
        """The llguidance grammar of the structured output asked for, checked here (400) before it queues."""
        if not grammars:
            grammars.append(Grammars(tokenizer, engine.vocab_size))
        try:
            compiled = grammar_for(kind, spec)
            error = grammars[0].error(compiled)
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e)
        if error:
            raise ApiError(400, f"{name}: {error}", param=name)
        return compiled

    async def sampling_params(req: p.SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if req.logit_bias and max(req.logit_bias) >= engine.vocab_size:
            raise ApiError(400, f"logit_bias token ids must be in [0, {engine.vocab_size})", param="logit_bias")
        # compiling a grammar (and, the first time, llguidance's view of the vocabulary) takes milliseconds to
        # a second: off the event loop, which is streaming everyone else's tokens
        asked = req.structured_output()
        compiled = await asyncio.to_thread(grammar, *asked) if asked else None
        try:
            return SamplingParams(
                n=req.n,
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                seed=None if req.seed in (None, -1) else req.seed,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                logit_bias=dict(req.logit_bias or {}),
                grammar=compiled,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def check_context(prompt_len: int, max_tokens: int | None) -> None:
        limit = engine.max_model_len
        if prompt_len + (max_tokens or 1) > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + (max_tokens or 1)} tokens ({prompt_len} in the messages, "
                f"{max_tokens or 1} in the completion).",
                param="max_tokens",
            )

    def make_requests(prompts: list[str | list[int]], params: SamplingParams, priority: int, max_tokens):
        """Tokenize and validate every prompt before queueing any."""
        out = []
        for prompt in prompts:
            try:
                r = engine.make_request(f"req-{uuid.uuid4().hex}", prompt, params, priority)
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt") from None
            check_context(len(r.prompt_token_ids), max_tokens)
            out.append(r)
        return out

    # ------------------------------------------------------------------ running requests
    async def run(requests, request: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merge the engine streams of several requests; record metrics and one log line per request."""
        start = time.monotonic()

        async def merged() -> AsyncIterator[tuple[int, RequestOutput]]:
            if len(requests) == 1:  # the common case: read the engine stream directly
                async for out in engine.generate_request(requests[0]):
                    yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i, r):
                try:
                    async for out in engine.generate_request(r):
                        await queue.put((i, out))
                except BaseException as e:  # delivered to the consumer, which decides the response
                    await queue.put((i, e))

            tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
            try:
                finished = 0
                while finished < len(requests):
                    i, item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    finished += item.finished
                    yield i, item
            finally:
                for t in tasks:
                    t.cancel()

        state.in_flight += 1
        done: set[int] = set()
        last: dict[int, float] = {}
        stream = merged()
        try:
            async for i, item in stream:
                now = time.monotonic()
                if i in last:
                    metrics.itl.observe(now - last[i])
                last[i] = now
                if item.finished:
                    done.add(i)
                    finish(item, request, start)
                yield i, item
        except EngineDeadError as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        finally:
            await stream.aclose()
            state.in_flight -= 1
            for i, r in enumerate(requests):
                if i not in done:  # client gone or error: the engine aborts it (see generate_request)
                    metrics.finished.labels("abort").inc(r.params.n)
                    if config.log_requests:
                        log.info(
                            json.dumps(
                                {
                                    "event": "request_aborted",
                                    "request_id": request.state.request_id,
                                    "engine_id": r.request_id,
                                    "model": model_name,
                                    "latency_s": round(time.monotonic() - start, 4),
                                }
                            )
                        )

    def finish(out: RequestOutput, request: Request, start: float) -> None:
        now = time.monotonic()
        if out.first_token_time:
            metrics.ttft.observe(out.first_token_time - out.arrival_time)
        if out.first_scheduled_time:
            metrics.queue.observe(out.first_scheduled_time - out.arrival_time)
        metrics.e2e.observe(now - out.arrival_time)
        for c in out.outputs:
            metrics.finished.labels(c.finish_reason or "unknown").inc()
        if config.log_requests:
            log.info(
                json.dumps(
                    {
                        "event": "request_finished",
                        "request_id": request.state.request_id,
                        "engine_id": out.request_id,
                        "model": model_name,
                        "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": sum(len(c.token_ids) for c in out.outputs),
                        "cached_tokens": out.num_cached_tokens,
                        "ttft_s": round(out.first_token_time - out.arrival_time, 4) if out.first_token_time else None,
                        "latency_s": round(now - start, 4),
                        "finish_reason": [c.finish_reason for c in out.outputs],
                    }
                )
            )

    async def until_disconnect(request: Request, work):
        """Run a coroutine; cancel it (aborting its engine requests) if the client goes away first."""
        task = asyncio.create_task(work)

        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.create_task(watch())
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            watcher.cancel()
            return task.result()
        task.cancel()
        raise ApiError(499, "client closed the request")

    def timeout_error() -> ApiError:
        metrics.rejected.labels("queue_timeout").inc()
        return ApiError(
            429, "the request waited too long in the queue; retry later", "overloaded", headers=_retry_after(5)
        )

    def usage(outs: list[RequestOutput]) -> p.Usage:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return p.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details={"cached_tokens": sum(o.num_cached_tokens for o in outs)},
        )

    def text_of(token_id: int) -> str:
        if token_id not in token_text:
            token_text[token_id] = tokenizer.decode([token_id])
        return token_text[token_id]

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        for lp in lps:
            tok = text_of(lp.token_id)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({text_of(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(tok)
        return out

    def chat_logprobs(lps: list[TokenLogprob]) -> p.ChatLogprobs:
        def entry(t, v):
            s = text_of(t)
            return p.TopLogprob(token=s, logprob=v, bytes=list(s.encode()))

        return p.ChatLogprobs(
            content=[
                p.TokenLogprobEntry(
                    **entry(lp.token_id, lp.logprob).model_dump(), top_logprobs=[entry(t, v) for t, v in lp.top]
                )
                for lp in lps
            ]
        )

    def sse(obj) -> str:
        data = obj if isinstance(obj, str) else obj.model_dump_json(exclude_none=True)
        return f"data: {data}\n\n"

    async def stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
        """Wait for the first event before answering 200, so errors before any token get a real status."""
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = ""
        except BaseException:
            await gen.aclose()
            raise

        async def body():
            try:
                yield first
                async for chunk in gen:
                    yield chunk
            except ApiError as e:  # after the 200: report in-band, then end the stream properly
                yield sse(json.dumps({"error": {"message": e.message, "type": e.type, "code": e.status}}))
                yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    # ------------------------------------------------------------------ endpoints
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
        return {"status": "ready", "model": model_name}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        card = p.ModelCard(
            id=model_name,
            created=created,
            root=config.model,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
        )
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: p.CompletionRequest = await admit(request, p.CompletionRequest)
        params = await sampling_params(req, req.max_tokens, req.logprobs)
        requests = make_requests(req.prompts(), params, req.priority, req.max_tokens)
        rid, n = f"cmpl-{request.state.request_id}", req.n
        created_at = int(time.time())  # one timestamp for every chunk of the response, as OpenAI's
        echo = [
            (r.prompt if r.prompt is not None else tokenizer.decode(r.prompt_token_ids)) if req.echo else ""
            for r in requests
        ]

        if req.stream:

            async def events():
                sent: dict[int, int] = {}
                sent_lp: dict[int, int] = {}
                finals = []
                async for i, out in run(requests, request):
                    for c in out.outputs:
                        if c.finish_reason == "timeout" and not c.token_ids:
                            raise timeout_error()
                        idx = i * n + c.index
                        start = sent.get(idx)
                        prefix = echo[i] if start is None else ""
                        start = start or 0
                        delta = c.text[start:]
                        if not delta and not prefix and c.finish_reason is None:
                            continue
                        sent[idx] = len(c.text)
                        lps = None
                        if req.logprobs is not None and c.logprobs:
                            lps = completion_logprobs(c.logprobs[sent_lp.get(idx, 0) :], start)
                            sent_lp[idx] = len(c.logprobs)
                        choice = p.CompletionChoice(
                            index=idx,
                            text=prefix + delta,
                            logprobs=lps,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                        yield sse(p.CompletionResponse(id=rid, created=created_at, model=model_name, choices=[choice]))
                    if out.finished:
                        finals.append(out)
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(
                        p.CompletionResponse(
                            id=rid, created=created_at, model=model_name, choices=[], usage=usage(finals)
                        )
                    )
                yield "data: [DONE]\n\n"

            return await stream_response(events())

        async def collect():
            finals: dict[int, RequestOutput] = {}
            async for i, out in run(requests, request):
                if out.finished:
                    finals[i] = out
            return [finals[i] for i in range(len(requests))]

        outs = await until_disconnect(request, collect())
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                if c.finish_reason == "timeout" and not c.token_ids:
                    raise timeout_error()
                lps = completion_logprobs(c.logprobs, 0) if req.logprobs is not None and c.logprobs else None
                choices.append(
                    p.CompletionChoice(
                        index=i * n + c.index,
                        text=echo[i] + c.text,
                        logprobs=lps,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        return p.CompletionResponse(
            id=rid, created=created_at, model=model_name, choices=choices, usage=usage(outs)
        ).model_dump()

    # chat_template_kwargs are variables for the template; the call's own arguments (tokenize, chat_template,
    # return_dict, …) would change what comes back or which template runs
    template_call_args = set(inspect.signature(tokenizer.apply_chat_template).parameters) - {"kwargs"}

    def render_chat(req: p.ChatCompletionRequest | p.TokenizeRequest) -> str:
        reserved = sorted(template_call_args & set(req.chat_template_kwargs or {}))
        if reserved:
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            return tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # the template rejected these messages (roles, order, …)
            raise ApiError(400, f"the chat template could not render these messages: {e}", param="messages") from None

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: p.TokenizeRequest = await admit(request, p.TokenizeRequest, shed_load=False)
        if req.messages is not None:  # the template writes the special tokens itself
            ids = tokenizer.encode(render_chat(req), add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return p.TokenizeResponse(
            count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs
        ).model_dump(exclude_none=True)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: p.DetokenizeRequest = await admit(request, p.DetokenizeRequest, shed_load=False)
        if req.tokens and max(req.tokens) >= engine.vocab_size:
            raise ApiError(400, f"token ids must be in [0, {engine.vocab_size})", param="tokens")
        return p.DetokenizeResponse(prompt=tokenizer.decode(req.tokens)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: p.ChatCompletionRequest = await admit(request, p.ChatCompletionRequest)
        ids = tokenizer.encode(render_chat(req), add_special_tokens=False)
        max_tokens = req.max_new_tokens
        top = req.top_logprobs or 0 if req.logprobs else None
        params = await sampling_params(req, max_tokens, top)
        requests = make_requests([ids], params, req.priority, max_tokens)
        rid = f"chatcmpl-{request.state.request_id}"
        created_at = int(time.time())

        if req.stream:

            async def events():
                sent: dict[int, int] = {}
                sent_lp: dict[int, int] = {}
                final = None
                async for _, out in run(requests, request):
                    for c in out.outputs:
                        if c.finish_reason == "timeout" and not c.token_ids:
                            raise timeout_error()
                        chunks = []
                        if c.index not in sent:
                            chunks.append(
                                p.ChatChunkChoice(index=c.index, delta=p.DeltaMessage(role="assistant", content=""))
                            )
                            sent[c.index] = 0
                        start = sent[c.index]
                        delta = c.text[start:]
                        if delta or c.finish_reason is not None:
                            lps = None
                            if req.logprobs and c.logprobs:
                                lps = chat_logprobs(c.logprobs[sent_lp.get(c.index, 0) :])
                                sent_lp[c.index] = len(c.logprobs)
                            chunks.append(
                                p.ChatChunkChoice(
                                    index=c.index,
                                    delta=p.DeltaMessage(content=delta),
                                    logprobs=lps,
                                    finish_reason=c.finish_reason,
                                    stop_reason=c.stop_reason,
                                )
                            )
                            sent[c.index] = len(c.text)
                        for ch in chunks:
                            yield sse(p.ChatCompletionChunk(id=rid, created=created_at, model=model_name, choices=[ch]))
                    if out.finished:
                        final = out
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(
                        p.ChatCompletionChunk(
                            id=rid, created=created_at, model=model_name, choices=[], usage=usage([final])
                        )
                    )
                yield "data: [DONE]\n\n"

            return await stream_response(events())

        async def collect():
            final = None
            async for _, out in run(requests, request):
                final = out
            return final

        out = await until_disconnect(request, collect())
        choices = []
        for c in out.outputs:
            if c.finish_reason == "timeout" and not c.token_ids:
                raise timeout_error()
            lps = chat_logprobs(c.logprobs) if req.logprobs and c.logprobs else None
            choices.append(
                p.ChatChoice(
                    index=c.index,
                    message=p.AssistantMessage(content=c.text),
                    logprobs=lps,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        return p.ChatCompletionResponse(
            id=rid, created=created_at, model=model_name, choices=choices, usage=usage([out])
        ).model_dump()

    return app
