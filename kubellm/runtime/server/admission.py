"""Whether a request may run at all, decided before any work is done for it: API key, ready/draining, rate limit,
body size, JSON and schema (a 400 naming the field), unsupported fields, model name, load shedding."""

from __future__ import annotations

import asyncio
import json
import re
from typing import NamedTuple

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from kubellm.runtime.engine.async_engine import AsyncLLMEngine
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.config import ServerConfig
from kubellm.runtime.server.errors import ApiError, retry_after
from kubellm.runtime.server.limits import ApiKeys, RateLimiter
from kubellm.runtime.server.metrics import ServerMetrics


def check_content_type(value: str | None) -> None:
    """As vLLM: a body declared as anything but JSON is refused (415), so a form post (curl -d's default) is
    not read as JSON by accident. JSON with parameters (charset) and +json types pass; a body with no content
    type at all is read as JSON, as it was before (raw HTTP clients often send none)."""
    if value is None or not value.strip():
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, f"Unsupported Media Type: {media!r}; only 'application/json' is allowed")


# a JSON \\u escape of a high surrogate not followed by a low one, or a low one (pairs are valid text)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|\\u[dD][c-fC-F][0-9a-fA-F]{2}")


class Caller(NamedTuple):
    key: str | None  # the API key presented (the rate limit's identity); None when keys are off or for the admin
    admin: bool


class ServerState:
    """What serve.py's drain reads and the admission checks: ready once warmed up, draining after SIGTERM."""

    def __init__(self):
        self.ready = False
        self.draining = False
        self.in_flight = 0


class Admission:
    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig, state: ServerState, metrics: ServerMetrics):
        self.engine, self.config, self.state, self.metrics = engine, config, state, metrics
        self.keys = ApiKeys(config.api_keys, config.api_key_file)
        self.admin_keys = ApiKeys([], config.admin_key_file) if config.admin_key_file else None
        self.limiter = RateLimiter(config.rate_limit_rpm, config.rate_limit_burst)

    def authorize(self, request: Request, admin_only: bool = False) -> Caller:
        """Who calls: the admin key (--admin-key-file) passes everywhere; elsewhere a valid API key, or anyone
        when keys are off (then a bearer string is no identity, and the rate limit keys on the client's
        address). 401 without valid credentials; 403 for an API key on an `admin_only` endpoint while an admin
        key is set."""
        header = request.headers.get("authorization", "")
        presented = header[7:].strip() if header.lower().startswith("bearer ") else None
        if self.admin_keys is not None and self.admin_keys.check(presented):
            return Caller(None, admin=True)
        if not self.keys.check(presented):
            self.metrics.rejected.labels("unauthorized").inc()
            raise ApiError(
                401, "missing or invalid API key", "authentication_error", headers={"WWW-Authenticate": "Bearer"}
            )
        if admin_only and self.admin_keys is not None:
            self.metrics.rejected.labels("unauthorized").inc()
            raise ApiError(403, "only the server's admin key may call this endpoint", "permission_error")
        return Caller(presented if self.keys.enabled else None, admin=False)

    async def admit(
        self, request: Request, model_cls: type[BaseModel], shed_load: bool = True, admin_only: bool = False
    ):
        """Auth → availability → rate limit (not for the admin key) → body → schema → model → load (for
        requests that queue in the engine: shed_load). Returns the validated request; raises ApiError on refusal."""
        caller = self.authorize(request, admin_only)
        self._check_available()
        if not caller.admin:
            self._check_rate(caller.key or (request.client.host if request.client else "anonymous"))
        req = self._validate(await self._read_json(request), model_cls)
        sequences = self._sequences(req)  # (the prompt limit holds for the render endpoints too)
        if shed_load:
            self._check_load(sequences)
        return req

    def _sequences(self, req) -> int:
        """The sequences a request queues: prompts × n (400 past --max-prompts-per-request prompts)."""
        prompts = len(req.prompts()) if hasattr(req, "prompts") else 1
        limit = self.config.max_prompts_per_request
        if prompts > limit:
            raise ApiError(400, f"at most {limit} prompts in one request, got {prompts}", param="prompt")
        # n: a field of the generating requests; on others (/tokenize) an unknown extra, maybe null
        n = getattr(req, "n", None)
        return prompts * (n if isinstance(n, int) else 1)

    def _check_available(self) -> None:
        state = self.state
        if state.draining or not state.ready or not self.engine.alive:
            self.metrics.rejected.labels("unavailable").inc()
            raise ApiError(
                503,
                "the server is draining" if state.draining else "the server is not ready",
                "service_unavailable",
                headers=retry_after(5),
            )

    def _check_rate(self, caller: str) -> None:
        wait = self.limiter.acquire(caller)
        if wait is not None:
            self.metrics.rejected.labels("rate_limited").inc()
            raise ApiError(429, "rate limit exceeded", "rate_limit_error", headers=retry_after(wait))

    async def _read_json(self, request: Request) -> dict:
        """The body as a JSON object, read up to the size limit (413 past it, whatever Content-Length said)."""
        check_content_type(request.headers.get("content-type"))
        limit = self.config.max_body_bytes
        body = bytearray()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
        try:
            async with asyncio.timeout(self.config.body_timeout_s):  # a slow body holds a connection and a task
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise ApiError(413, f"request body larger than {limit} bytes")
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.config.body_timeout_s:g} s") from None
        except ClientDisconnect:  # gone mid-body: nobody to answer, nothing to log as an error
            raise ApiError(499, "client closed the request") from None
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None
        if _SURROGATE_ESCAPE.search(body):  # cheap first look; then exact (an escaped backslash may precede)
            try:
                json.dumps(payload, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise ApiError(400, "the body has a lone UTF-16 surrogate (\\ud800-\\udfff) in a string") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the body must be a JSON object")
        return payload

    def _validate(self, payload: dict, model_cls: type[BaseModel]):
        try:
            req = model_cls.model_validate(payload)
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or None
            msg = err["msg"].removeprefix("Value error, ")
            raise ApiError(400, f"{loc}: {msg}" if loc else msg, param=loc) from None
        unsupported = p.unsupported_field(req)
        if unsupported:
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
        model = getattr(req, "model", None)  # the served model, or a loaded LoRA adapter
        if model is not None and model != self.config.model_name and model not in self.engine.loras:
            raise ApiError(404, f"The model `{model}` does not exist.", "not_found_error", param="model")
        return req

    def _check_load(self, incoming: int = 1) -> None:
        """Shed load: too many sequences would wait with this request's, or the oldest waiting too long (429
        with Retry-After)."""
        if self.engine.num_waiting_with(incoming) > self.config.max_waiting_requests:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, "too many requests are waiting; retry later", "overloaded", headers=retry_after(2))
        age = self.engine.oldest_waiting_age()
        limit = self.config.max_queue_time_s
        if limit is not None and age > limit:
            self.metrics.rejected.labels("queue_time").inc()
            raise ApiError(429, "the queue is too slow right now; retry later", "overloaded", headers=retry_after(age))
