"""The bridge between asyncio request handlers and the Engine.

One background thread builds and owns the Engine: it is the only thread that ever touches it
(the engine and its scheduler are not thread-safe). Handlers talk to it through a thread-safe
command queue (add / abort / abort_all / call / stop) and get results back on a per-request
asyncio queue (or, for `call`, a future), fed with `loop.call_soon_threadsafe`. The thread
steps the engine while it has work and blocks on the command queue when idle, so an idle
server burns no CPU.

Accounting that handlers read (admission against --max-waiting, /debug/engine, /metrics) is
published by the thread into plain values under a lock after every iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import traceback

from atom_jax.engine.info import EngineInfo
from atom_jax.serve.errors import SERVER_ERROR, UNAVAILABLE, OpenAIError, unavailable
from atom_jax.serve.prepare import PreparedRequest

log = logging.getLogger("atom_jax.serve")


@dataclasses.dataclass(frozen=True)
class Accepted:
    """First event of every admitted request: the engine has queued it."""


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request ended without a normal finish; `error` is what to tell the client."""

    error: OpenAIError


class RequestStream:
    """Handler side of one request: engine outputs arrive here in order, `Failed` at most once.

    Outputs are cumulative (all tokens so far), so a slow consumer may skip to the newest one
    without losing anything: `next_output` does that to avoid falling behind the engine."""

    def __init__(self, request: PreparedRequest):
        self.request = request
        self.request_id = request.request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False  # a final output or a failure was consumed
        # Engine-thread bookkeeping for latency metrics (only the engine thread writes these).
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self.released = False

    async def next_output(self):
        """The newest output (RequestOutput); raises OpenAIError on failure."""
        event = await self.queue.get()
        while not self._is_final(event) and not self.queue.empty():
            event = self.queue.get_nowait()
        return self._consume(event)

    async def final_output(self):
        while True:
            out = await self.next_output()
            if out.finished:
                return out

    def _is_final(self, event) -> bool:
        return isinstance(event, Failed) or getattr(event, "finished", False)

    def _consume(self, event):
        if isinstance(event, Failed):
            self.finished = True
            raise event.error
        if event.finished:
            self.finished = True
        return event

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        return await self.next_output()


async def merged_outputs(streams: list[RequestStream]):
    """(index, output) from several streams (a request's choices) as they arrive, until each
    has finished; a failure (OpenAIError) of any ends the iteration by raising it."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    waiting = {asyncio.ensure_future(s.next_output()): i for i, s in enumerate(streams)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=waiting.get):  # same-step outputs in choice order
                i = waiting.pop(task)
                out = task.result()
                yield i, out
                if not out.finished:
                    waiting[asyncio.ensure_future(streams[i].next_output())] = i
    finally:
        for task in waiting:  # the consumer stopped, or a choice failed
            task.cancel()


class EngineLoop:
    def __init__(self, build_engine, model_name: str, *, warmup=None, max_waiting: int | None = None,
                 metrics=None, on_start_failure=None):
        """`build_engine()` runs on the engine thread; `warmup(engine)` too, before ready.
        `on_start_failure(reason)` is called (on the engine thread) if either raises: the
        server then exits instead of serving a model it does not have."""
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self._build_engine, self._model_name = build_engine, model_name
        self._warmup, self._max_waiting, self._metrics = warmup, max_waiting, metrics
        self._on_start_failure = on_start_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._lock = threading.Lock()
        self._in_flight = 0  # admitted, not yet finished (lock)
        self._engine_waiting = 0  # the scheduler's waiting count after the last step (lock)
        self._snapshot: dict = {"ready": False}  # lock
        self._accepting = True  # lock
        self._thread: threading.Thread | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.failure: str | None = None  # why the engine could not start
        self.info: EngineInfo | None = None
        self.consecutive_step_failures = 0

    # ---- event-loop side -----------------------------------------------------------------
    def start(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        self._aio_loop = aio_loop
        self._thread = threading.Thread(target=self._run, name="atom-jax-engine", daemon=True)
        self._thread.start()

    async def submit(self, request: PreparedRequest) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises OpenAIError (503 when
        not ready, shutting down or the waiting queue is full; 400 if the engine refuses it)."""
        return (await self.submit_all([request]))[0]

    async def submit_all(self, requests: list[PreparedRequest]) -> list[RequestStream]:
        """`submit` for the choices of one request (n > 1): admitted together against
        --max-waiting, and if the engine refuses one, the others are aborted and its error
        raised (the client gets all of its choices or none)."""
        if not self.ready.is_set() or self.info is None:
            raise unavailable("the engine is still loading; retry shortly", "server_starting", 5)
        streams = [RequestStream(r) for r in requests]
        with self._lock:
            if not self._accepting:
                raise unavailable("the server is shutting down", "server_shutting_down", 5)
            if self._max_waiting is not None and self._queued(len(streams)) > self._max_waiting:
                if self._metrics:
                    self._metrics.requests_rejected.labels("queue_full").inc()
                raise unavailable(f"the waiting queue is full ({self._max_waiting} requests); "
                                  "retry later", "queue_full", 1)
            self._in_flight += len(streams)
        for stream in streams:
            self._commands.put(("add", stream))
        error = None
        try:
            for stream in streams:
                first = await stream.queue.get()
                if isinstance(first, Failed):
                    stream.finished = True
                    error = error or first.error
        except BaseException:
            for stream in streams:
                self.abort(stream.request_id)  # the handler went away before the acks
            raise
        if error is not None:
            for stream in streams:
                if not stream.finished:
                    self.abort(stream.request_id)
            raise error
        return streams

    def _queued(self, adding: int = 0) -> int:
        """Requests not yet holding a slot once `adding` more are admitted: beyond the slots of
        all ranks, or (when pages or the token budget hold admissions back) what the scheduler
        reported after its last step, plus those added."""
        slots = self.info.dp * self.info.num_slots
        held_back = self._engine_waiting + adding if self._engine_waiting else 0
        return max(self._in_flight + adding - slots, held_back)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call(self, fn):
        """Run `fn(engine)` on the engine thread (between steps); returns its result or raises
        its exception. 503 (OpenAIError) when the engine is not ready or has stopped."""
        if not self.ready.is_set():
            raise unavailable("the engine is still loading; retry shortly", "server_starting", 5)
        if self.stopped.is_set() or not self._accepting:
            raise unavailable("the server is shutting down", "server_shutting_down", 5)
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", (fn, future)))
        return await future

    async def start_profile(self, log_dir: str, steps: int | None = None) -> None:
        await self.call(lambda engine: engine.start_profile(log_dir, steps))

    async def stop_profile(self) -> str | None:
        return await self.call(lambda engine: engine.stop_profile())

    def begin_shutdown(self) -> None:
        """Refuse new requests and abort the in-flight ones (their streams end with 'abort').
        Called from a signal handler too, so no lock: a bool store and SimpleQueue.put are
        safe there (the lock could be held by the interrupted main thread)."""
        self._accepting = False
        self._commands.put(("abort_all", None))

    def shutdown(self, timeout: float = 30.0) -> None:
        self.begin_shutdown()
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread still busy after %.0f s (a step or compile in "
                            "progress); leaving it to exit with the process", timeout)

    def cluster_failed(self, reason: str) -> None:
        """A multi-host run lost a process: every request in flight and queued gets a 503 now
        (the process exits right after). Called from any thread; the engine thread is then
        stuck in a collective or is the caller, so touching the streams here is safe."""
        self._accepting = False
        self.failure = f"multi-host run failed: {reason}"
        self._refuse_all(OpenAIError(503, f"the multi-host run failed ({reason}); the server is stopping",
                                     type=UNAVAILABLE, code="cluster_failure"))

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._snapshot, in_flight=self._in_flight, accepting=self._accepting)

    # ---- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._build_engine()
            self.info = EngineInfo.from_engine(engine, self._model_name)
            if self._warmup is not None:
                t0 = time.perf_counter()
                self._warmup(engine)
                log.info("warm-up done in %.1f s", time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - report any start failure on /health
            self.failure = f"{type(e).__name__}: {e}"
            log.error("engine failed to start:\n%s", traceback.format_exc())
            self.stopped.set()
            if self._on_start_failure is not None:
                self._on_start_failure(self.failure)
            return
        self._publish(engine)
        self.ready.set()
        log.info("engine ready: model %s, context %d tokens", self.info.model_name,
                 self.info.max_context)
        try:
            self._serve(engine)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave handlers waiting
            self.failure = f"engine loop crashed: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.failure, traceback.format_exc())
            self._accepting = False
            self._refuse_all(OpenAIError(500, "the engine loop crashed", type=SERVER_ERROR,
                                         code="engine_error"))
        finally:
            self.stopped.set()

    def _serve(self, engine) -> None:
        idle_interval = getattr(engine, "idle_interval", None)  # multi-host keepalive; fixed
        while True:
            busy = engine.has_unfinished()
            commands = self._drain(block=not busy, timeout=idle_interval)
            stop = False
            for kind, arg in commands:
                if kind == "add":
                    self._add(engine, arg)
                elif kind == "abort":
                    self._abort(engine, arg)
                elif kind == "abort_all":
                    for rid in list(self._streams):
                        self._abort(engine, rid)
                elif kind == "call":
                    self._call(engine, *arg)
                elif kind == "stop":
                    stop = True
            if stop:
                self._stop(engine)
                return
            # Step after any command too: it returns outputs of requests that finished outside
            # a step (abort, or refused on add), which frees their bookkeeping.
            if engine.has_unfinished() or commands:
                self._step(engine)
            elif idle_interval is not None:
                engine.keepalive()
            self._publish(engine)

    def _drain(self, block: bool, timeout: float | None = None) -> list:
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=timeout))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, engine, stream: RequestStream) -> None:
        req = stream.request
        try:
            engine.add_request(prompt_token_ids=req.prompt_token_ids, params=req.params,
                               request_id=req.request_id)
        except ValueError as e:  # the engine's own validation: the request's fault
            self._fail(stream, OpenAIError(400, str(e), param=getattr(e, "param", None),
                                           code=getattr(e, "code", None)))
            return
        except Exception as e:  # noqa: BLE001 - fail this request alone
            log.exception("adding request %s failed", req.request_id)
            self._fail(stream, OpenAIError(500, f"internal error: {type(e).__name__}",
                                           type=SERVER_ERROR, code="internal_error"))
            return
        self._streams[req.request_id] = stream
        if self._metrics:
            self._metrics.prompt_tokens.inc(len(req.prompt_token_ids))
        self._push(stream, Accepted())

    def _abort(self, engine, request_id: str) -> None:
        if request_id in self._streams:
            try:
                engine.abort(request_id)
            except Exception:  # noqa: BLE001
                log.exception("abort of %s failed", request_id)

    def _call(self, engine, fn, future) -> None:
        try:
            result, error = fn(engine), None
        except Exception as e:  # noqa: BLE001 - the caller gets it
            result, error = None, e
        self._settle(future, result, error)

    def _settle(self, future, result=None, error: BaseException | None = None) -> None:
        def settle():
            if future.done():  # the caller went away
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        try:
            self._aio_loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed
            pass

    def _step(self, engine) -> None:
        try:
            outputs = engine.step()
        except Exception:  # noqa: BLE001
            # The engine fails the requests of a step whose model call raised by itself; this
            # is anything else: fail what is in flight and keep serving.
            self.consecutive_step_failures += 1
            log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
            for rid, stream in list(self._streams.items()):
                self._abort(engine, rid)
                self._fail(stream, OpenAIError(500, "the engine step failed", type=SERVER_ERROR,
                                               code="engine_error"))
            return
        self.consecutive_step_failures = 0
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            try:
                self._record(stream, out, now)
                if out.finished and out.finish_reason == "error":
                    self._fail(stream, OpenAIError(500, "the request failed inside the engine",
                                                   type=SERVER_ERROR, code="engine_error"))
                    continue
                if out.finished:  # account first: whoever sees the end sees it counted
                    self._finish(stream)
                self._push(stream, out)
            except Exception:  # noqa: BLE001 - one request's bookkeeping must not stop others
                log.exception("processing output of %s failed", out.request_id)
                self._abort(engine, out.request_id)
                self._fail(stream, OpenAIError(500, "internal error while processing output",
                                               type=SERVER_ERROR, code="internal_error"))

    def _record(self, stream: RequestStream, out, now: float) -> None:
        m = self._metrics
        n_new = len(out.new_token_ids)
        if n_new:
            if stream.first_token_at is None:
                stream.first_token_at = now
                if m:
                    m.ttft.observe(now - stream.request.arrival)
                    # Tokens sampled together in one step share one arrival time.
                    for _ in range(n_new - 1):
                        m.itl.observe(0.0)
            elif m:
                gap = (now - stream.last_token_at) / n_new
                for _ in range(n_new):
                    m.itl.observe(gap)
            stream.last_token_at = now
            stream.num_tokens += n_new
            if m:
                m.generation_tokens.inc(n_new)
        if out.finished and m:
            m.e2e.observe(now - stream.request.arrival)
            m.requests_finished.labels(out.finish_reason or "unknown").inc()

    def _stop(self, engine) -> None:
        for rid in list(self._streams):
            self._abort(engine, rid)
        try:
            self._step(engine)  # deliver the aborts' final outputs
        except Exception:  # noqa: BLE001
            log.exception("final step failed")
        try:
            if getattr(engine, "stop_profile", None) and engine.stop_profile():
                log.info("profiler trace stopped and written")
        except Exception:  # noqa: BLE001
            log.exception("stopping the profiler trace failed")
        try:
            if getattr(engine, "close", None):
                engine.close()  # multi-host: releases the other processes
        except Exception:  # noqa: BLE001
            log.exception("closing the engine failed")
        self._refuse_all(OpenAIError(503, "the server shut down", type=UNAVAILABLE,
                                     code="server_shutting_down"))
        self._publish(engine)
        log.info("engine loop stopped")

    def _refuse_all(self, error: OpenAIError) -> None:
        """Fail every live request and every add still queued (each was counted in flight)."""
        for stream in list(self._streams.values()):
            self._fail(stream, error)
        for kind, arg in self._drain(block=False):
            if kind == "add":
                self._fail(arg, error)
            elif kind == "call":
                self._settle(arg[1], error=error)

    def _fail(self, stream: RequestStream, error: OpenAIError) -> None:
        self._finish(stream)
        self._push(stream, Failed(error))

    def _finish(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        if not stream.released:  # every admitted request leaves the in-flight count once
            stream.released = True
            with self._lock:
                self._in_flight -= 1

    def _push(self, stream: RequestStream, event) -> None:
        try:
            self._aio_loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _publish(self, engine) -> None:
        snap = {"ready": True, **engine.snapshot(), "live_requests": len(self._streams),
                "consecutive_step_failures": self.consecutive_step_failures}
        with self._lock:
            self._snapshot = snap
            self._engine_waiting = snap["num_waiting"]
