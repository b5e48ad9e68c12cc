"""Running admitted requests: a response's engine streams merged into one, latency metrics, one log line per
finished or aborted request, the in-flight count the drain waits on, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING

from fastapi import Request

from kubellm.runtime.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailed, RequestRefused
from kubellm.runtime.engine.output import RequestOutput
from kubellm.runtime.server.admission import ServerState
from kubellm.runtime.server.config import ServerConfig
from kubellm.runtime.server.errors import ApiError, retry_after
from kubellm.runtime.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from kubellm.runtime.engine.intake import Submission
    from kubellm.tracing import Tracing

log = logging.getLogger("kubellm.server")


class Runner:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        config: ServerConfig,
        state: ServerState,
        metrics: ServerMetrics,
        tracing: Tracing | None = None,
    ):
        self.engine, self.config, self.state, self.metrics = engine, config, state, metrics
        self.tracing = tracing  # None: no spans (kubellm/tracing.py)

    async def run(self, requests: list[Submission], request: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index of the request, its output so far) as the engine produces them; records metrics and one log
        line per request, finished or not."""
        start = time.monotonic()
        self.state.in_flight += 1
        done: set[int] = set()
        last: dict[int, float] = {}
        stream = self._merged(requests)
        try:
            async for i, item in stream:
                now = time.monotonic()
                if i in last:
                    self.metrics.itl.observe(now - last[i])
                last[i] = now
                if item.finished:
                    done.add(i)
                    self._finished(item, request, start, requests[i])
                yield i, item
        except EngineDeadError as e:  # the engine died, or the drain's deadline passed
            raise ApiError(503, str(e), "service_unavailable", headers=retry_after(5)) from None
        except RequestRefused as e:
            raise ApiError(400, str(e)) from None
        except RequestFailed as e:  # the engine goes on; this request could not be run
            raise ApiError(500, str(e), "server_error") from None
        finally:
            await stream.aclose()
            self.state.in_flight -= 1
            for i, r in enumerate(requests):
                if i not in done:  # client gone or error: the engine aborts it (see generate_request)
                    self._aborted(r, request, start)

    async def _merged(self, requests: list[Submission]) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(requests) == 1:  # the common case: read the engine stream directly
            async for out in self.engine.generate_request(requests[0]):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, r):
            try:
                async for out in self.engine.generate_request(r):
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

    def _finished(self, out: RequestOutput, request: Request, start: float, sub: Submission) -> None:
        now = time.monotonic()
        if self.tracing is not None:
            self._span(request, sub, out, now)
        m = self.metrics
        if out.first_token_time:
            m.ttft.observe(out.first_token_time - out.arrival_time)
        if out.first_scheduled_time:
            m.queue.observe(out.first_scheduled_time - out.arrival_time)
        m.e2e.observe(now - out.arrival_time)
        m.prompt_tokens.observe(len(out.prompt_token_ids))
        m.generation_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            m.finished.labels(c.finish_reason or "unknown").inc()
        if self.config.log_requests:
            ttft = round(out.first_token_time - out.arrival_time, 4) if out.first_token_time else None
            self._log(
                "request_finished",
                request,
                out.request_id,
                prompt_tokens=len(out.prompt_token_ids),
                completion_tokens=sum(len(c.token_ids) for c in out.outputs),
                cached_tokens=out.num_cached_tokens,
                ttft_s=ttft,
                latency_s=round(now - start, 4),
                finish_reason=[c.finish_reason for c in out.outputs],
            )

    def _aborted(self, r: Submission, request: Request, start: float) -> None:
        if self.tracing is not None:
            self._span(request, r, None, time.monotonic())
        self.metrics.finished.labels("abort").inc(r.params.n)
        if self.config.log_requests:
            self._log("request_aborted", request, r.request_id, latency_s=round(time.monotonic() - start, 4))

    def _span(self, request: Request, sub: Submission, out: RequestOutput | None, now: float) -> None:
        """One SERVER span per engine request (vLLM's `llm_request`), the child of the caller's `traceparent` (the
        router's span), made when the request ends from the engine's timestamps: arrival to now. out None:
        aborted (the client left, or an error)."""
        to_wall_ns = time.time_ns() - int(time.monotonic() * 1e9)  # the engine's times are time.monotonic()
        arrival, p = sub.request.arrival_time, sub.params
        attributes = {
            "gen_ai.response.model": self.config.model_name,
            "gen_ai.request.id": request.state.request_id,
            "kubellm.engine_request_id": sub.request_id,
            "gen_ai.request.max_tokens": p.max_tokens,
            "gen_ai.request.temperature": p.temperature,
            "gen_ai.request.top_p": p.top_p,
            "gen_ai.request.n": p.n,
            "gen_ai.usage.prompt_tokens": len(sub.prompt_token_ids),
            "gen_ai.latency.e2e": now - arrival,
            "gen_ai.response.finish_reasons": ["abort"],
        }
        if out is not None:
            attributes |= {
                "gen_ai.usage.completion_tokens": sum(len(c.token_ids) for c in out.outputs),
                "kubellm.cached_tokens": out.num_cached_tokens,
                "gen_ai.response.finish_reasons": [c.finish_reason or "unknown" for c in out.outputs],
                "gen_ai.latency.time_to_first_token": out.first_token_time - arrival if out.first_token_time else None,
                "gen_ai.latency.time_in_queue": (
                    out.first_scheduled_time - arrival if out.first_scheduled_time else None
                ),
            }
        span = self.tracing.start_server_span("llm_request", request.headers, int(arrival * 1e9) + to_wall_ns)
        self.tracing.end(span, attributes, None if out else "aborted", int(now * 1e9) + to_wall_ns)

    def _log(self, event: str, request: Request, engine_id: str, **fields) -> None:
        head = {"event": event, "request_id": request.state.request_id, "engine_id": engine_id}
        trace = request.headers.get("traceparent", "").split("-")
        if len(trace) == 4:  # W3C trace context (kubellm router sends one): the same trace id in both logs
            head["trace_id"] = trace[1]
        log.info(json.dumps({**head, "model": self.config.model_name, **fields}))

    async def collect(self, requests: list[Submission], request: Request) -> list[RequestOutput]:
        """The final output of each request, in order; cancelled (and aborted) if the client goes away first."""

        async def last_outputs():
            finals: dict[int, RequestOutput] = {}
            async for i, out in self.run(requests, request):
                finals[i] = out
            return [finals[i] for i in range(len(requests))]

        return await until_disconnect(request, last_outputs())

    def check_timeout(self, out: RequestOutput) -> None:
        """429 if the request waited in the engine's queue past its timeout without producing a token."""
        for c in out.outputs:
            if c.finish_reason == "timeout" and not c.token_ids:
                self.metrics.rejected.labels("queue_timeout").inc()
                raise ApiError(
                    429, "the request waited too long in the queue; retry later", "overloaded", headers=retry_after(5)
                )


async def until_disconnect(request: Request, work: Coroutine):
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
