"""AsyncLLMEngine: the engine core runs in its own process (as in vLLM V1), so the model loop never shares a
GIL with the HTTP server. The server side tokenizes and validates, sends requests and aborts down a pipe,
and receives one message per engine step: every changed request's delta plus a snapshot of the gauges.
The server side also detokenizes (batched over the step), except for requests with stop strings: finishing
those depends on the text, so the engine detokenizes them itself.

Step messages are read on the server's event loop (a reader on the pipe), not by a thread: a thread needs
the GIL back from a busy event loop several times a step (recv, two tokenizer calls, the hand-over), and at
GPU step rates it fell behind until the engine blocked on a full pipe (bench/stand_in.py: the emulated
device idle up to 38% of the time at 256 streams).

    server process (event loop)                          engine-core process
    make_request → sender thread ──[add|abort]──►  run_engine_core: LLMEngine.step() loop
    streams ◄── pipe reader (detokenization) ◄──[deltas, snapshot]──┘  (scheduling, model, sampling)
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.detokenizer import DecodeState, Detokenizer
from kubellm.runtime.engine.engine import EngineSnapshot, LLMEngine, check_request, tokenize_prompt
from kubellm.runtime.engine.sequence import CompletionOutput, RequestDelta, RequestOutput
from kubellm.runtime.process import exit_process
from kubellm.runtime.sampling_params import SamplingParams

log = logging.getLogger("kubellm.engine")

MAX_MESSAGES_PER_READ = 32  # engine steps handled per wake-up of the pipe reader
HEARTBEAT_S = 1.0  # an idle engine process still reports this often, so the server can tell idle from stuck


class EngineDeadError(RuntimeError):
    """The engine process is gone; the server reports it (503, /health) and Kubernetes restarts the pod."""


@dataclass(slots=True)
class Submission:
    """A validated request on its way to the engine process."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float


@dataclass(slots=True)
class EngineInfo:
    max_model_len: int
    vocab_size: int
    num_gpu_blocks: int
    device: str


@dataclass(slots=True)
class StepMessage:
    deltas: list[RequestDelta]
    errors: list[tuple[str, str]]  # (request_id, why the engine refused it)
    snapshot: EngineSnapshot
    num_added: int  # submissions taken in so far (errors included)


def freeze_startup_heap() -> None:
    """Move what is alive after startup (modules, the model's Python objects, the tokenizer, the app) out of
    the garbage collector's reach: in the server and engine processes it lives as long as the process, and
    every full collection would walk it again (~350k objects: 170–340 ms on a 2-core VM), stalling the step
    loop or the event loop every few seconds at GPU rates, since each step allocates thousands of small
    objects (vLLM's engine core does the same). Measured with bench/stand_in.py at 256 streams: the longest
    engine pause 170 → 3.5 ms, the server's 336 → 45 ms, ITL p99 314 → 89 ms. Not for LLM in a user's
    process: an engine dropped there must stay collectable (bench/offline.py frees it for the HF baselines)."""
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------- the engine-core process
def run_engine_core(
    config: EngineConfig,
    inbox: Connection,
    outbox: Connection,
    make_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine,
) -> None:
    """Entry point of the engine process: load, report ready, then step while there is work. Signals are
    the server's business (it drains first); the pipe closing means the server is gone. make_engine: a
    picklable factory (bench/stand_in.py swaps the model for an emulated device). Ends the process."""
    try:
        _engine_core(config, inbox, outbox, make_engine)
    finally:
        exit_process(0)


def _engine_core(
    config: EngineConfig, inbox: Connection, outbox: Connection, make_engine: Callable[[EngineConfig], LLMEngine]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = make_engine(config)
    except BaseException:
        outbox.send(("failed", traceback.format_exc()))
        return
    freeze_startup_heap()
    outbox.send(
        (
            "ready",
            EngineInfo(
                engine.max_model_len, engine.vocab_size, engine.runner.num_gpu_blocks, str(engine.runner.device)
            ),
        )
    )
    num_added = 0
    try:
        while True:
            if not engine.has_unfinished_requests():
                inbox.poll(HEARTBEAT_S)  # idle: sleep until the server sends something, or report anyway
            errors = []
            while inbox.poll():
                for kind, payload in inbox.recv():
                    if kind == "add":
                        num_added += 1
                        try:
                            engine.add(
                                engine.make_request(
                                    payload.request_id,
                                    payload.prompt_token_ids,
                                    payload.params,
                                    payload.priority,
                                    payload.arrival_time,
                                )
                            )
                        except ValueError as e:
                            errors.append((payload.request_id, str(e)))
                    elif kind == "abort":
                        engine.abort_request(payload)
                    else:  # "stop"
                        return
            deltas = [req.delta() for req in engine.step_requests()] if engine.has_unfinished_requests() else []
            outbox.send(StepMessage(deltas, errors, engine.snapshot(), num_added))
    except (EOFError, OSError, BrokenPipeError):  # the server process is gone
        return
    except BaseException:
        outbox.send(("dead", traceback.format_exc()))
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- the server side
class _Stream:
    """Deltas for one request; the consumer takes all that piled up at once."""

    __slots__ = ("event", "items")

    def __init__(self):
        self.items: list[RequestDelta | BaseException] = []
        self.event = asyncio.Event()


def _widen_pipe(conn: Connection) -> None:
    """Room for ~50 steps of 256 deltas instead of ~3 (64 KB), so a busy moment on the event loop (a burst of
    finished requests, a GC pass) does not stall the engine on a full pipe. Linux only; best effort."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass


class AsyncLLMEngine:
    """The server's handle on the engine process: start, generate (an async stream per request), abort,
    the latest snapshot for metrics and load shedding, shutdown."""

    def __init__(self, config: EngineConfig, make_engine: Callable[[EngineConfig], LLMEngine] = LLMEngine):
        from transformers import AutoTokenizer

        self.config = config
        self.make_engine = make_engine
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.detokenizer = Detokenizer(self.tokenizer)
        # requests this side detokenizes: request_id → (skip_special_tokens, one state per output)
        self._decoding: dict[str, tuple[bool, list[DecodeState]]] = {}
        self.info: EngineInfo | None = None
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._num_sent = 0  # submissions sent; the engine reports how many it has taken
        self._num_taken = 0
        self._process: multiprocessing.Process | None = None
        self._outbox: Connection | None = None  # step messages from the engine process
        self._loop: asyncio.AbstractEventLoop | None = None  # where they are read
        self._stopping = False
        self.last_report = time.monotonic()  # when the engine process last sent a step or a heartbeat

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the engine process, wait until the model is loaded, then read its messages on this loop."""
        inbox_w = await asyncio.to_thread(self._spawn)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._outbox.fileno(), self._on_messages)
        threading.Thread(target=self._send_loop, args=(inbox_w,), name="kubellm-engine-send", daemon=True).start()

    def _spawn(self) -> Connection:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        inbox_r, inbox_w = ctx.Pipe(duplex=False)
        outbox_r, outbox_w = ctx.Pipe(duplex=False)
        _widen_pipe(outbox_r)
        # not daemonic: it starts the tensor-parallel ranks' processes; stopped at exit at the latest
        self._process = ctx.Process(
            target=run_engine_core, args=(self.config, inbox_r, outbox_w, self.make_engine), name="kubellm-engine-core"
        )
        self._process.start()
        atexit.register(self.shutdown)
        inbox_r.close()
        outbox_w.close()
        try:
            kind, payload = outbox_r.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading (code {self._process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"the engine process failed to load the model:\n{payload}")
        self.info, self._outbox = payload, outbox_r
        self.last_report = time.monotonic()
        return inbox_w

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._stop_reading()
        self._outgoing.put(("stop", None))
        self._outgoing.put(None)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive() and self.error is None

    def silent_for(self) -> float:
        """Seconds since the engine process last reported (every step, and every second when idle)."""
        return time.monotonic() - self.last_report

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def num_waiting(self) -> int:
        """Waiting in the engine, plus what was sent since its last step beyond the free batch slots: a burst
        between two steps counts at once, and requests that will run at once do not count."""
        snap, pending = self.snapshot, self._num_sent - self._num_taken
        if snap.num_waiting:
            return snap.num_waiting + pending
        return max(0, pending - max(0, self.config.max_num_seqs - snap.num_running))

    def oldest_waiting_age(self) -> float:
        arrival = self.snapshot.oldest_waiting_arrival
        return time.monotonic() - arrival if arrival is not None else 0.0

    # ------------------------------------------------------------------ requests
    def make_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> Submission:
        """Tokenize and validate here, so a bad request is refused without a round trip."""
        text, ids = tokenize_prompt(self.tokenizer, prompt)
        check_request(ids, params, self.vocab_size, self.max_model_len)
        return Submission(request_id, text, ids, params, priority, time.monotonic())

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        return self.generate_request(self.make_request(request_id, prompt, params, priority))

    async def generate_request(self, sub: Submission) -> AsyncIterator[RequestOutput]:
        """Stream the request's output so far, once per batch of deltas; leaving early (client gone, task
        cancelled) aborts it in the engine."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        stream = _Stream()
        self._streams[sub.request_id] = stream
        params = sub.params
        if params.detokenize and not params.stop:
            self._decoding[sub.request_id] = (
                params.skip_special_tokens,
                [DecodeState.after_prompt(sub.prompt_token_ids) for _ in range(params.n)],
            )
            sub = replace(sub, params=replace(params, detokenize=False))
        self._num_sent += 1
        self._outgoing.put(("add", sub))
        logprobs = params.logprobs is not None
        out = RequestOutput(
            sub.request_id,
            sub.prompt,
            sub.prompt_token_ids,
            [CompletionOutput(i, "", [], None, [] if logprobs else None) for i in range(sub.params.n)],
            False,
            arrival_time=sub.arrival_time,
        )
        try:
            while not out.finished:
                await stream.event.wait()
                stream.event.clear()
                items, stream.items = stream.items, []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    out.apply(item)
                yield out
        finally:
            self._streams.pop(sub.request_id, None)
            self._decoding.pop(sub.request_id, None)
            if not out.finished:
                self.abort(sub.request_id)

    def abort(self, request_id: str) -> None:
        self._outgoing.put(("abort", request_id))

    # ------------------------------------------------------------------ the pipes
    def _send_loop(self, conn: Connection) -> None:
        """Batch whatever piled up into one message, so a burst of requests costs one pipe write. A thread:
        a burst of long prompts can fill the pipe until the engine's next step reads it."""
        while True:
            batch = [self._outgoing.get()]
            while True:
                try:
                    batch.append(self._outgoing.get_nowait())
                except queue.Empty:
                    break
            end = None in batch
            batch = [m for m in batch if m is not None]
            try:
                if batch:
                    conn.send(batch)
            except (OSError, BrokenPipeError):
                return
            if end:
                conn.close()
                return

    def _on_messages(self) -> None:
        """The engine process wrote (runs on the event loop): handle the messages waiting, up to a bound so
        that a fast engine cannot starve the loop. Several steps read at once reach each stream as one event."""
        conn = self._outbox
        try:
            for _ in range(MAX_MESSAGES_PER_READ):
                if not conn.poll():
                    return
                msg = conn.recv()
                if not isinstance(msg, StepMessage):  # ("dead", traceback)
                    log.error("engine loop died:\n%s", msg[1])
                    self._stop_reading()
                    self._fail(EngineDeadError(f"engine failure: {msg[1].strip().splitlines()[-1]}"))
                    return
                self._on_step(msg)
        except (EOFError, OSError):
            self._stop_reading()
            if not self._stopping:
                self._process.join(1)
                self._fail(EngineDeadError(f"the engine process exited (code {self._process.exitcode})"))

    def _stop_reading(self) -> None:
        self._loop.remove_reader(self._outbox.fileno())

    def _on_step(self, msg: StepMessage) -> None:
        self.last_report = time.monotonic()
        self.snapshot, self._num_taken = msg.snapshot, msg.num_added
        deltas = self._add_text(msg.deltas) if self._decoding else msg.deltas
        items: list[tuple[str, RequestDelta | BaseException]] = [(d[0], d) for d in deltas]
        items += [(rid, ValueError(why)) for rid, why in msg.errors]
        self._deliver(items)

    def _add_text(self, deltas: list[RequestDelta]) -> list[RequestDelta]:
        """Detokenize the step's new tokens of the requests this side decodes: two batched calls per step."""
        pending = []  # (delta position, output position, state, skip)
        for i, (request_id, _, _, _, _, outs) in enumerate(deltas):
            decoding = self._decoding.get(request_id)
            if decoding is None:
                continue
            skip, states = decoding
            for j, (index, token_ids, *_) in enumerate(outs):
                states[index].token_ids.extend(token_ids)
                pending.append((i, j, states[index], skip))
        if not pending:
            return deltas
        before = [len(state.text) for _, _, state, _ in pending]
        self.detokenizer.advance([state for _, _, state, _ in pending], [skip for *_, skip in pending])
        deltas = list(deltas)
        for (i, j, state, skip), start in zip(pending, before):
            request_id, finished, cached, scheduled, first, outs = deltas[i]
            index, token_ids, _, logprobs, finish_reason, stop_reason = outs[j]
            if finish_reason is not None:
                self.detokenizer.flush(state, skip)
            outs = list(outs)
            outs[j] = (index, token_ids, state.text[start:], logprobs, finish_reason, stop_reason)
            deltas[i] = (request_id, finished, cached, scheduled, first, outs)
            if finished:
                self._decoding.pop(request_id, None)
        return deltas

    def _deliver(self, items: list[tuple[str, RequestDelta | BaseException]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.items.append(item)
                stream.event.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._deliver([(request_id, error) for request_id in list(self._streams)])
