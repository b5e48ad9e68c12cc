"""Serving: what every OpenAI endpoint is built from (admission, request building, running, formatting), and
the stream loop they share, so that an endpoint is one handler that only shapes its requests and chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from kubellm.runtime.engine.async_engine import AsyncLLMEngine
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.admission import Admission, ServerState
from kubellm.runtime.server.config import ServerConfig
from kubellm.runtime.server.formatting import (
    DONE,
    ChoiceDelta,
    LogprobFormatter,
    StreamFormatter,
    sse,
    stream_response,
    usage,
)
from kubellm.runtime.server.metrics import ServerMetrics
from kubellm.runtime.server.params import RequestBuilder
from kubellm.runtime.server.running import Runner

if TYPE_CHECKING:
    from kubellm.runtime.engine.intake import Submission
    from kubellm.tracing import Tracing


class Serving:
    """The pieces every endpoint handler uses, built once per app."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        config: ServerConfig,
        state: ServerState,
        metrics: ServerMetrics,
        tracing: Tracing | None = None,
    ):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = config
        self.model_name = config.model_name
        self.admission = Admission(engine, config, state, metrics)
        self.builder = RequestBuilder(engine)
        self.runner = Runner(engine, config, state, metrics, tracing)
        self.logprobs = LogprobFormatter(engine.tokenizer)

    def answered_model(self, requested: str | None) -> str:
        """The `model` a response names: the LoRA adapter asked for, as vLLM's, else the served model."""
        return requested if requested is not None and requested in self.engine.loras else self.model_name

    async def stream(
        self,
        requests: list[Submission],
        request: Request,
        formatter: StreamFormatter,
        chunks: Callable[[ChoiceDelta], Iterable[BaseModel]],
        usage_chunk: Callable[[p.Usage], BaseModel] | None,
        generated: bool = True,
    ) -> StreamingResponse:
        """An SSE response: the endpoint's chunks for every delta, then usage (usage_chunk: if asked for) and
        [DONE]. The status waits for the first event, so a refusal before any token is a real 4xx/5xx."""
        return await stream_response(self._events(requests, request, formatter, chunks, usage_chunk, generated))

    async def _events(self, requests, request, formatter, chunks, usage_chunk, generated) -> AsyncIterator[str]:
        finals = []
        async for i, out in self.runner.run(requests, request):
            self.runner.check_timeout(out)
            for delta in formatter.deltas(i, out):
                for chunk in chunks(delta):
                    yield sse(chunk)
            if out.finished:
                finals.append(out)
        if usage_chunk is not None:
            yield sse(usage_chunk(usage(finals, generated)))
        yield DONE
