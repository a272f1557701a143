"""EngineLoop: runs the LLMEngine on its own thread so asyncio front ends never block on model compute.

The engine thread owns all engine state. Other threads talk to it only through a command queue (submit, abort,
call, stop); outputs go back through a per-request sink callable invoked on the engine thread (an asyncio sink hops
to its event loop with call_soon_threadsafe). Between two steps the thread drains the queue: a submitted request is
tokenized and validated (or queued for its images) there, and its first output says whether it was accepted.

Given a factory instead of an engine, the loop builds the engine on its own thread first (loading, warm-up), so the
whole model's compute runs on one thread. That matters on CPU: GNU OpenMP (PyTorch's intra-op threads) keeps one
worker team per thread that ever ran a parallel region, and once its workers outnumber the CPUs it cuts their
spin-wait to ~100 iterations, so every later parallel op (each GEMV of a decode step) pays a futex wake-up. A model
loaded on the caller's thread and stepped on this one left two teams on a 2-core machine: batch-1 decode ran ~15%
slower than stepping the same engine on the loading thread (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from rtp_mm.errors import EngineDead, RtpMmError
from rtp_mm.kernels.collectives import GroupFailed
from rtp_mm.llm.engine.engine import LLMEngine, RequestOutput
from rtp_mm.llm.engine.request import EngineRequest

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        idle_wait_s: float = 0.05,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        """``engine``: a built engine, or a factory run on the loop's thread (errors are re-raised here).
        ``on_fatal``: called on the engine thread after the engine stopped for good (a tensor-parallel rank failed),
        once every request has its error; the server exits there."""
        self._fatal: BaseException | None = None
        self._on_fatal = on_fatal
        self._factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine = engine if isinstance(engine, LLMEngine) else None  # type: ignore[assignment]
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[int, Sink] = {}
        self._stopped = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="rtp-mm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def submit(self, requests: list[EngineRequest], sink: Sink) -> None:
        """Queue ``requests`` as one command: the engine admits them between the same two steps, so they share
        that step's encoder batch and prefill."""
        if not self.alive:
            raise EngineDead("the engine is shut down")
        self._commands.put(("add", requests, sink))
        self._wake.set()

    def abort(self, request_id: int) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float | None = 30.0) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result (directly when called from
        the engine thread). ``timeout`` None waits as long as the engine lives."""
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        if not self.alive:
            raise EngineDead("the engine is shut down")
        done = threading.Event()
        box: dict[str, Any] = {}

        def run(engine: LLMEngine) -> None:
            try:
                box["value"] = fn(engine)
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()

        self._commands.put(("call", run))
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.1):
            if not self.alive:  # stopped before running it: queued commands are dropped
                raise EngineDead("the engine stopped before answering")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("engine did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(("stop",))
        self._wake.set()
        self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
        if sink is not None:
            try:
                sink(out)
            except Exception:  # a broken consumer must not stop the engine
                logger.exception("output sink of request %s failed", out.request_id)

    def _drain_commands(self) -> bool:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            kind = cmd[0]
            if kind == "add":
                _, requests, sink = cmd
                for req in requests:
                    self._sinks[req.request_id] = sink
                    for out in self.engine.add(req):
                        self._deliver(out)
            elif kind == "abort":
                self.engine.abort(cmd[1])
                self._sinks.pop(cmd[1], None)
            elif kind == "call":
                cmd[1](self.engine)
            elif kind == "stop":
                return False

    def _run(self) -> None:
        if self._factory is not None:
            try:
                self.engine = self._factory()
            except BaseException as e:  # handed to the constructor's thread
                self._build_error = e
                self._stopped.set()
                self._ready.set()
                return
        self._ready.set()
        try:
            while self._drain_commands():
                if not self.engine.has_work:
                    self.engine.idle()
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except GroupFailed:
                    raise  # the tensor-parallel group is gone: no step can run again
                except Exception as e:
                    # An internal fault fails the requests in flight (freeing their blocks); the loop survives.
                    logger.exception("engine step failed")
                    error = e if isinstance(e, RtpMmError) else RtpMmError(f"engine step failed: {e!r}")
                    outputs = self.engine.fail_all(error)
                for out in outputs:
                    self._deliver(out)
        except GroupFailed as e:
            self._fatal = e
            logger.critical("%s; the engine stops", e)
        finally:
            self._stopped.set()
            if self._fatal is None:
                self.engine.close()
            reason = "the engine was shut down" if self._fatal is None else f"the engine stopped: {self._fatal}"
            for out in self.engine.fail_all(EngineDead(reason)):
                self._deliver(out)
            if self._fatal is not None and self._on_fatal is not None:
                self._on_fatal(self._fatal)
