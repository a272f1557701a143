"""EngineLoop: runs the LLMEngine on its own thread so asyncio front ends never block on model compute.

Other threads talk to it only through a command queue (submit, abort, stop); outputs go back through a per-request
sink callable invoked on the engine thread (an asyncio sink hops to its event loop with call_soon_threadsafe).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from rtp_mm.errors import EngineDead, RtpMmError
from rtp_mm.llm.engine.engine import LLMEngine, RequestOutput
from rtp_mm.llm.engine.request import Request

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[int, Sink] = {}
        self._stopped = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="rtp-mm-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def submit(self, req: Request, sink: Sink) -> None:
        if not self.alive:
            raise EngineDead("the engine is shut down")
        self._commands.put(("add", req, sink))
        self._wake.set()

    def abort(self, request_id: int) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run(engine: LLMEngine) -> None:
            try:
                box["value"] = fn(engine)
            except Exception as e:  # handed back to the caller
                box["error"] = e
            done.set()

        self._commands.put(("call", run))
        self._wake.set()
        if not done.wait(timeout):
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
                _, req, sink = cmd
                self._sinks[req.request_id] = sink
                self.engine.add_request(req)
            elif kind == "abort":
                self.engine.abort(cmd[1])
                self._sinks.pop(cmd[1], None)
            elif kind == "call":
                cmd[1](self.engine)
            elif kind == "stop":
                return False

    def _run(self) -> None:
        try:
            while self._drain_commands():
                if not self.engine.has_work:
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    # An internal fault fails the requests in flight (freeing their blocks); the loop survives.
                    logger.exception("engine step failed")
                    error = e if isinstance(e, RtpMmError) else RtpMmError(f"engine step failed: {e!r}")
                    outputs = self.engine.fail_all(error)
                for out in outputs:
                    self._deliver(out)
        finally:
            self._stopped.set()
            for out in self.engine.fail_all(EngineDead("the engine was shut down")):
                self._deliver(out)
