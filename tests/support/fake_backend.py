"""Lightweight stand-ins for `kubellm serve` pods behind the router: OpenAI-shaped answers streamed at a fixed
token rate, and a /metrics whose vLLM gauges reflect their real load (running up to `slots`, the rest waiting).

Each backend counts prefix-cache hits the way a pod's cache would see them: a request whose leading
`prefix_chars` characters this backend has served before is a hit. Many backends run in one process (one port
each) so that 16 of them cost the router's benchmark little CPU: `python -m tests.support.fake_backend --ports
9001,9002 --token-rate 50`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


class FakeBackend:
    def __init__(self, name: str, models: list[str], token_rate: float, slots: int, prefix_chars: int = 64):
        self.name, self.models, self.token_rate, self.prefix_chars = name, models, token_rate, prefix_chars
        self.slots = asyncio.Semaphore(slots)
        self.running = self.waiting = self.served = self.hits = self.finished = 0
        self.extra_waiting = 0  # set through POST /fake/load: a queue this router did not cause
        self.stall_after: int | None = None  # POST /fake/load {"stall_after": n}: streams go silent after n chunks
        self.seen: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/fake/load", self.set_load)
        return app

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def set_load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.extra_waiting = int(body.get("waiting", self.extra_waiting))
        self.stall_after = body.get("stall_after", self.stall_after)
        return web.json_response({"ok": True})

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [
            f'vllm:num_requests_running{{model_name="{self.models[0]}"}} {self.running}',
            f'vllm:num_requests_waiting{{model_name="{self.models[0]}"}} {self.waiting + self.extra_waiting}',
            f'vllm:kv_cache_usage_perc{{model_name="{self.models[0]}"}} {min(1.0, self.running / 64)}',
            f'vllm:request_success_total{{finished_reason="length",model_name="{self.models[0]}"}} {self.finished}',
            f"fake_requests_total {self.served}",
            f"fake_prefix_hits_total {self.hits}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _prefix(self, body: dict) -> str:
        if "messages" in body:
            text = "".join(f"<{m.get('role')}>{m.get('content')}" for m in body["messages"])
        else:
            text = str(body.get("prompt", ""))
        return text[: self.prefix_chars]

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") not in self.models:
            return web.json_response({"error": {"message": "unknown model", "code": 404}}, status=404)
        prefix = self._prefix(body)
        self.served += 1
        self.hits += prefix in self.seen
        self.seen.add(prefix)
        tokens = int(body.get("max_tokens") or 16)
        headers = {"X-Backend": self.name}
        if request.headers.get("Authorization"):
            headers["X-Saw-Authorization"] = request.headers["Authorization"]
        self.waiting += 1
        async with self.slots:
            self.waiting -= 1
            self.running += 1
            try:
                if body.get("stream"):
                    return await self._stream(request, body, tokens, headers)
                await asyncio.sleep(tokens / self.token_rate)
                return web.json_response(self._completion(body, "tok " * tokens, tokens), headers=headers)
            finally:
                self.running -= 1
                self.finished += 1

    def _completion(self, body: dict, text: str, tokens: int) -> dict:
        chat = "messages" in body
        choice = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {
            "id": f"{self.name}-{self.served}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1},
        }

    async def _stream(self, request: web.Request, body: dict, tokens: int, headers: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        chat = "messages" in body
        for i in range(tokens):
            if self.stall_after is not None and i >= self.stall_after:
                await asyncio.sleep(3600)  # a pod gone silent, its connection open (a vanished node)
            await asyncio.sleep(1 / self.token_rate)
            delta = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
            chunk = {
                "id": f"{self.name}-{self.served}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, **delta, "finish_reason": "length" if i == tokens - 1 else None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def serve(ports: list[int], models: list[str], token_rate: float, slots: int) -> None:
    runners = []
    for port in ports:
        runner = web.AppRunner(FakeBackend(f"pod-{port}", models, token_rate, slots).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ports", required=True, help="comma-separated: one backend per port")
    p.add_argument("--models", default="fake", help="comma-separated served model names")
    p.add_argument("--token-rate", type=float, default=50.0, help="tokens per second per stream")
    p.add_argument("--slots", type=int, default=64, help="requests running at once; the rest wait")
    a = p.parse_args()
    asyncio.run(serve([int(x) for x in a.ports.split(",")], a.models.split(","), a.token_rate, a.slots))


if __name__ == "__main__":
    main()
