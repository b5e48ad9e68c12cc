"""AsyncLLMEngine: the engine core runs in its own process (as in vLLM V1), so the model loop never shares a
GIL with the HTTP server. The server side tokenizes and validates (intake.py), sends requests and aborts down
a pipe, and receives one StepOutput per engine step (wire.py): every changed request's token delta plus a
snapshot of the gauges. The server side also detokenizes and matches stop strings (output.py, batched over the
step), telling the core to stop a sequence whose stop string appeared.

Step messages are read on the server's event loop (a reader on the pipe), not by a thread: a thread needs
the GIL back from a busy event loop several times a step (recv, two tokenizer calls, the hand-over), and at
GPU step rates it fell behind until the engine blocked on a full pipe.

    server process (event loop)                               engine-core process
    make_request → sender thread ──[EngineRequest|Abort]──►  run_engine_core: EngineCore.step() loop
    streams ◄── pipe reader (OutputProcessor) ◄──[StepOutput]──┘  (scheduling, model, sampling)
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection

import msgspec

from kubellm.fit import DoesNotFit, termination_message
from kubellm.runtime.engine import wire
from kubellm.runtime.engine.core import EngineCore
from kubellm.runtime.engine.intake import Submission, make_submission
from kubellm.runtime.engine.output import OutputProcessor, RequestOutput, publish, view_of
from kubellm.runtime.engine.wire import (
    Abort,
    EngineInfo,
    EngineSnapshot,
    LoadLora,
    LoraReply,
    Shutdown,
    StepOutput,
    UnloadLora,
)
from kubellm.runtime.process import exit_process
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.settings import EngineConfig

log = logging.getLogger("kubellm.engine")

MAX_MESSAGES_PER_READ = 32  # engine steps handled per wake-up of the pipe reader
MAX_FAILED_STEPS = 3  # steps failing in a row before the engine process gives up (Dead: the pod restarts)
HEARTBEAT_S = 1.0  # an idle engine process still reports this often, so the server can tell idle from stuck


class EngineDeadError(RuntimeError):
    """The engine process is gone; the server reports it (503, /health) and Kubernetes restarts the pod."""


class RequestRefused(ValueError):
    """The engine core refused this request when it was added (its message is for the user)."""


class RequestFailed(RuntimeError):
    """A step running this request raised, or its grammar broke; the request ended there and the engine serves
    the others."""


class EngineStartRefused(RuntimeError):
    """The engine would not start, for a reason to show as it is (the model does not fit: kubellm/fit.py)."""

    def __init__(self, reason: str, message: str, termination_message: str):
        super().__init__(message)
        self.reason, self.termination_message = reason, termination_message


class LoraOpError(ValueError):
    """The engine core could not load or unload a LoRA adapter; `field` names the setting or field at fault,
    not_loaded: no adapter of that name is loaded."""

    def __init__(self, message: str, field: str | None, not_loaded: bool = False):
        super().__init__(message)
        self.field, self.not_loaded = field, not_loaded


def freeze_startup_heap() -> None:
    """Move what is alive after startup (modules, the model's Python objects, the tokenizer, the app) out of
    the garbage collector's reach: in the server and engine processes it lives as long as the process, and
    every full collection would walk it again (~350k objects: 170–340 ms on a 2-core VM), stalling the step
    loop or the event loop every few seconds at GPU rates, since each step allocates thousands of small
    objects (vLLM's engine core does the same; the pauses it removes are in bench/RESULTS.md). Not for LLM in a
    user's process: an engine dropped there must stay collectable (bench/offline.py frees it for the HF
    baselines)."""
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------- the engine-core process
def run_engine_core(
    config: EngineConfig,
    inbox: Connection,
    outbox: Connection,
    make_core: Callable[[EngineConfig], EngineCore] = EngineCore,
) -> None:
    """Entry point of the engine process: load, report ready, then step while there is work. Signals are
    the server's business (it drains first); the pipe closing means the server is gone. make_core: a
    picklable factory (bench/stand_in.py swaps the model for an emulated device). Ends the process."""
    try:
        _engine_core(config, inbox, outbox, make_core)
    finally:
        exit_process(0)


def _start_core(
    config: EngineConfig, outbox: Connection, make_core: Callable[[EngineConfig], EngineCore]
) -> EngineCore | None:
    """The core, or None after telling the server why it could not start: a refusal (the model does not fit:
    kubellm/fit.py) is a reason for the operator to show, anything else a traceback."""
    try:
        return make_core(config)
    except DoesNotFit as e:
        outbox.send_bytes(wire.encode(wire.StartRefused(e.reason, str(e), termination_message(e.estimate))))
    except BaseException:
        outbox.send_bytes(wire.encode(wire.Failed(traceback.format_exc())))
    return None


def _engine_core(
    config: EngineConfig, inbox: Connection, outbox: Connection, make_core: Callable[[EngineConfig], EngineCore]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    core = _start_core(config, outbox, make_core)
    if core is None:
        return
    freeze_startup_heap()
    outbox.send_bytes(wire.encode(wire.Ready(core.info())))
    num_added = 0
    failed_steps = 0  # in a row: a step that fails whatever it runs is the engine's fault, not a request's
    try:
        while True:
            if not core.has_unfinished_requests():
                inbox.poll(HEARTBEAT_S)  # idle: sleep until the server sends something, or report anyway
            errors, failed, lora_replies = [], [], []
            while inbox.poll():
                for msg in wire.decode_to_core(inbox.recv_bytes()):
                    if isinstance(msg, wire.EngineRequest):
                        num_added += msg.params.n  # sequences, as the server's load shedding counts
                        try:
                            core.add(msg)
                        except Exception as e:  # this request only (add registers nothing until it succeeds)
                            errors.append((msg.request_id, f"{type(e).__name__}: {e}"))
                    elif isinstance(msg, Abort):
                        core.abort(msg.request_id, msg.index)
                    elif isinstance(msg, LoadLora | UnloadLora):
                        lora_replies.append(core.lora_op(msg))
                    else:  # Shutdown
                        return
            deltas = []
            if core.has_unfinished_requests():
                try:
                    deltas = core.step()
                    failed = core.take_failures()
                    failed_steps = 0
                except Exception as e:  # fail the requests of this step, keep serving the others
                    failed_steps += 1
                    if failed_steps > MAX_FAILED_STEPS:
                        raise
                    why = f"the engine failed running this request: {type(e).__name__}: {e}"
                    failed = [(request_id, why) for request_id in core.fail_step()]
                    log.error("engine step failed; its %d request(s) end:\n%s", len(failed), traceback.format_exc())
            step = StepOutput(deltas, errors, core.snapshot(), num_added, failed, lora_replies)
            outbox.send_bytes(wire.encode(step))
    except (EOFError, OSError, BrokenPipeError):  # the server process is gone
        return
    except BaseException:
        outbox.send_bytes(wire.encode(wire.Dead(traceback.format_exc())))
    finally:
        core.shutdown()


# ---------------------------------------------------------------------- the server side
class _Stream:
    """Wakes one request's consumer when its output changed (the OutputProcessor updates it in place), or
    carries the error that ends it."""

    __slots__ = ("error", "event")

    def __init__(self):
        self.error: BaseException | None = None
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

    def __init__(self, config: EngineConfig, make_core: Callable[[EngineConfig], EngineCore] = EngineCore):
        from transformers import AutoTokenizer

        self.config = config
        self.make_core = make_core
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.output = OutputProcessor(self.tokenizer)
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
        self.loras: dict[str, str] = {}  # the LoRA adapters loaded in the core: name → path
        self._lora_ops: dict[str, asyncio.Future] = {}  # load/unload messages awaiting the core's reply

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the engine process, wait until the model is loaded, then read its messages on this loop."""
        inbox_w = await asyncio.to_thread(self._spawn)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._outbox.fileno(), self._on_messages)
        # uvloop (libuv) makes a polled fd non-blocking; a step message the engine is still writing would then
        # fail recv_bytes with EAGAIN mid-message, which read as a dead engine under load. Blocking, recv_bytes
        # waits for the rest of a message whose start woke the reader.
        os.set_blocking(self._outbox.fileno(), True)
        threading.Thread(target=self._send_loop, args=(inbox_w,), name="kubellm-engine-send", daemon=True).start()

    def _spawn(self) -> Connection:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
        inbox_r, inbox_w = ctx.Pipe(duplex=False)
        outbox_r, outbox_w = ctx.Pipe(duplex=False)
        _widen_pipe(outbox_r)
        # not daemonic: it starts the tensor-parallel ranks' processes; stopped at exit at the latest
        self._process = ctx.Process(
            target=run_engine_core, args=(self.config, inbox_r, outbox_w, self.make_core), name="kubellm-engine-core"
        )
        self._process.start()
        atexit.register(self.shutdown)
        inbox_r.close()
        outbox_w.close()
        try:
            msg = wire.decode_from_core(outbox_r.recv_bytes())
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading (code {self._process.exitcode})") from None
        if isinstance(msg, wire.StartRefused):
            raise EngineStartRefused(msg.reason, msg.message, msg.termination_message)
        if not isinstance(msg, wire.Ready):
            raise RuntimeError(f"the engine process failed to load the model:\n{msg.traceback}")
        self.info, self._outbox = msg.info, outbox_r
        self.loras = dict(msg.info.loras)
        self.last_report = time.monotonic()
        return inbox_w

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._stop_reading()
        self._outgoing.put(Shutdown())
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

    def num_waiting_with(self, incoming: int) -> int:
        """num_waiting once `incoming` more sequences are sent: those the free batch slots take at once do not
        wait (load shedding counts sequences, prompts × n, not requests)."""
        snap, pending = self.snapshot, self._num_sent - self._num_taken
        free = 0 if snap.num_waiting else max(0, self.config.max_num_seqs - snap.num_running - pending)
        return self.num_waiting + max(0, incoming - free)

    def oldest_waiting_age(self) -> float:
        arrival = self.snapshot.oldest_waiting_arrival
        return time.monotonic() - arrival if arrival is not None else 0.0

    # ------------------------------------------------------------------ requests
    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        lora_name: str | None = None,
    ) -> Submission:
        """Tokenize and validate here (intake.py), so a bad request is refused without a round trip."""
        return make_submission(
            self.tokenizer,
            self.vocab_size,
            self.max_model_len,
            request_id,
            prompt,
            params,
            priority,
            lora_name=lora_name,
        )

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        return self.generate_request(self.make_request(request_id, prompt, params, priority))

    async def generate_request(self, sub: Submission) -> AsyncIterator[RequestOutput]:
        """Stream the request's output so far, once per batch of steps; leaving early (client gone, task
        cancelled) aborts it in the engine."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        stream = _Stream()
        req = sub.request
        self._streams[req.request_id] = stream
        work = self.output.add(req.request_id, sub.prompt, req.prompt_token_ids, req.params, req.arrival_time)
        out = view_of(work)  # changes only here, between yields, never while the consumer holds it
        self._num_sent += req.params.n  # sequences (the core counts what it took the same way)
        self._outgoing.put(req)
        try:
            while not out.finished:
                await stream.event.wait()
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                publish(work, out)
                yield out
        finally:
            self._streams.pop(req.request_id, None)
            if not work.finished:
                self.output.abort(req.request_id)
                self.abort(req.request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self._outgoing.put(Abort(request_id, index))

    # ------------------------------------------------------------------ LoRA adapters
    async def load_lora(self, name: str, path: str) -> None:
        """Load an adapter in the core (LoraOpError naming the field when it cannot be)."""
        await self._lora_op(LoadLora(uuid.uuid4().hex, name, path))
        self.loras[name] = path

    async def unload_lora(self, name: str) -> None:
        await self._lora_op(UnloadLora(uuid.uuid4().hex, name))
        self.loras.pop(name, None)

    async def _lora_op(self, op: LoadLora | UnloadLora) -> None:
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._lora_ops[op.op_id] = future
        self._outgoing.put(op)
        try:
            reply: LoraReply = await future
        finally:
            self._lora_ops.pop(op.op_id, None)
        if reply.error is not None:
            raise LoraOpError(reply.error, reply.field, reply.not_loaded)

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
                    conn.send_bytes(self._encode(batch))
            except (OSError, BrokenPipeError):
                return
            if end:
                conn.close()
                return

    def _encode(self, batch: list) -> bytes:
        """The batch as one message; a message that cannot be encoded (intake bounds every value, so never
        expected) fails its own request instead of this thread, which every request needs."""
        try:
            return wire.encode(batch)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError):
            good = []
            for msg in batch:
                try:
                    wire.encode(msg)
                    good.append(msg)
                except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as e:
                    if isinstance(msg, wire.EngineRequest):
                        why = f"{type(e).__name__}: {e}"
                        self._loop.call_soon_threadsafe(self._unsent, msg.request_id, msg.params.n, why)
            return wire.encode(good)

    def _unsent(self, request_id: str, n: int, why: str) -> None:
        self._num_sent -= n
        self.output.abort(request_id)
        self._wake(request_id, RequestRefused(why))

    def _on_messages(self) -> None:
        """The engine process wrote (runs on the event loop): handle the messages waiting, up to a bound so
        that a fast engine cannot starve the loop. Several steps read at once reach each stream as one event."""
        conn = self._outbox
        try:
            for _ in range(MAX_MESSAGES_PER_READ):
                if not conn.poll():
                    return
                msg = wire.decode_from_core(conn.recv_bytes())
                if not isinstance(msg, StepOutput):  # Dead
                    log.error("engine loop died:\n%s", msg.traceback)
                    self._stop_reading()
                    self._fail(EngineDeadError(f"engine failure: {msg.traceback.strip().splitlines()[-1]}"))
                    return
                self._on_step(msg)
        except (EOFError, OSError):
            self._stop_reading()
            if not self._stopping:
                self._process.join(1)
                self._fail(EngineDeadError(f"the engine process exited (code {self._process.exitcode})"))

    def _stop_reading(self) -> None:
        self._loop.remove_reader(self._outbox.fileno())

    def _on_step(self, msg: StepOutput) -> None:
        self.last_report = time.monotonic()
        self.snapshot, self._num_taken = msg.snapshot, msg.num_added
        changed, aborts = self.output.process(msg.deltas)
        for abort in aborts:  # their stop strings appeared: the core stops them
            self._outgoing.put(abort)
        for request_id, why in msg.errors:
            self.output.abort(request_id)
            self._wake(request_id, RequestRefused(why))
        for request_id, why in msg.failed:
            self.output.abort(request_id)
            self._wake(request_id, RequestFailed(why))
        for out in changed:
            self._wake(out.request_id)
        for reply in msg.lora_replies:
            future = self._lora_ops.get(reply.op_id)
            if future is not None and not future.done():
                future.set_result(reply)

    def _wake(self, request_id: str, error: BaseException | None = None) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.error = stream.error or error
            stream.event.set()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.end_all(error)
        for future in self._lora_ops.values():
            if not future.done():
                future.set_exception(error)

    def end_all(self, error: BaseException) -> None:
        """End every stream in flight with this error (the drain's deadline passed: each client gets a clean
        error instead of a cut connection); they are aborted in the core as their consumers leave."""
        for request_id in list(self._streams):
            self._wake(request_id, error)
