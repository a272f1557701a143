"""EngineClient: the one way into a running engine, from any thread.

It builds the engine on the engine thread (``EngineLoop`` + ``build_engine``) and afterwards never touches engine
state itself: requests cross the loop's command queue (``submit``, ``cancel``, ``call``) and outputs come back
through per-request sinks. What it holds for callers is immutable (``info``) or read-only (the tokenizer for token
texts, the vision model for preprocessing images on the caller's threads). The HTTP server and the offline ``LLM``
use this class only.

    client = EngineClient(ModelConfig(...), EngineConfig(...))
    req = client.request("Hello", GenerateConfig(max_new_tokens=8))
    outs = client.run([req])                    # blocking, any thread
    stream = client.stream(req)                 # on an event loop: await stream.accepted(); async for out in stream
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rtp_mm.api import embeddings
from rtp_mm.api.builder import BuiltEngine, ModelInfo, build_engine, check_backends, resolve_model_config
from rtp_mm.api.prompts import PromptProcessor, refuse_images
from rtp_mm.config import EngineConfig, ModelConfig
from rtp_mm.errors import CheckpointError, ConfigError, EngineDead, InvalidRequest, RtpMmError, UpdateError
from rtp_mm.llm.engine.engine import LLMEngine, RequestOutput
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.loop import EngineLoop
from rtp_mm.llm.engine.multimodal import EncoderInput
from rtp_mm.llm.engine.request import EngineRequest
from rtp_mm.llm.lora.manager import diff
from rtp_mm.model_types import resolve_model_type
from rtp_mm.vision.inputs import prepare_image


class EngineClient:
    """Thread-safe. Invariant: engine state is only ever touched on the engine thread."""

    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig | None = None,
        skip_tokenizer_init: bool = False,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        engine_config = engine_config or EngineConfig()
        model_config = resolve_model_config(model_config)
        check_backends(resolve_model_type(model_config.model_type), engine_config)
        built: list[BuiltEngine] = []

        def build() -> LLMEngine:  # on the engine thread; the loop's constructor waits for it
            built.append(build_engine(model_config, engine_config, skip_tokenizer_init))
            return built[0].engine

        self._loop = EngineLoop(build, on_fatal=on_fatal)  # on_fatal: a tensor-parallel rank failed
        parts = built[0]
        self.info: ModelInfo = parts.info
        self.tokenizer = parts.tokenizer
        self.vision = parts.vision
        self.model = parts.model  # read by work the client runs on the engine thread (embeddings)
        self.processor = None
        if parts.tokenizer is not None:
            self.processor = PromptProcessor(parts.tokenizer, parts.vision, self.info.model_type)
        self._ids = itertools.count(1)
        # Unfinished streams, for fail_streams. Weak: a stream its consumer dropped unread must not stay here.
        self._streams: weakref.WeakSet[RequestStream] = weakref.WeakSet()
        self._streams_lock = threading.Lock()  # streams are opened and finished on any event loop's thread
        # LoRA: the loader reads adapter folders on the caller's thread (it is immutable); updates are serialised so
        # each diffs against the last one, and the name -> path snapshot is what callers read.
        self._lora_loader = parts.engine.lora.loader
        self._lora_lock = threading.Lock()
        self._adapters: dict[str, str] = self.call(lambda engine: engine.lora.infos())

    # ---- requests ---------------------------------------------------------------------------------------------
    def request(
        self, prompt: Any, config: GenerateConfig | None = None, images: Sequence[EncoderInput] = ()
    ) -> EngineRequest:
        """A request to submit: ``prompt`` is text, chat messages or token ids; ``images`` come from
        ``prepare_images``. The config is validated here; the prompt when the engine admits it."""
        config = config or GenerateConfig()
        config.validate()
        if images and self.vision is None:
            refuse_images(self.info.model_type)
        if not all(isinstance(image, EncoderInput) for image in images):
            raise InvalidRequest("images must be prepared with EngineClient.prepare_images")
        return EngineRequest(next(self._ids), prompt, config, tuple(images))

    def prepare_image(self, image: Any, index: int = 0) -> EncoderInput:
        """Decode, hash and preprocess one image (a PIL image, encoded bytes or a path) on the calling thread."""
        if self.vision is None:
            refuse_images(self.info.model_type)
        return prepare_image(self.vision, image, index)

    def prepare_images(self, images: Sequence[Any]) -> tuple[EncoderInput, ...]:
        return tuple(self.prepare_image(image, k) for k, image in enumerate(images))

    def submit(self, requests: EngineRequest | list[EngineRequest], sink: Callable[[RequestOutput], None]) -> None:
        """Queue ``requests`` (admitted together, between the same two engine steps); every output is passed to
        ``sink`` on the engine thread, the first of each request being its admission."""
        self._loop.submit(requests if isinstance(requests, list) else [requests], sink)

    def stream(self, request: EngineRequest) -> RequestStream:
        """Submit ``request`` and consume its outputs on the running event loop."""
        return RequestStream(self, request)

    def run(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """Run every request to completion (batched by the engine); final outputs in request order. Blocking."""
        results: dict[int, RequestOutput] = {}
        done = threading.Event()
        lock = threading.Lock()

        def sink(out: RequestOutput) -> None:
            if out.finished:
                with lock:
                    results[out.request_id] = out
                    if len(results) == len(requests):
                        done.set()

        self.submit(requests, sink)
        while requests and not done.wait(0.5):
            if not self._loop.alive:
                raise EngineDead("the engine stopped before the requests finished")
        outs = [results[r.request_id] for r in requests]
        for out in outs:
            if out.error is not None:
                raise out.error
        return outs

    def cancel(self, request_id: int) -> None:
        self._loop.abort(request_id)

    def fail_streams(self, error: RtpMmError) -> int:
        """End every unfinished stream read on the running event loop with ``error`` and cancel its request in the
        engine (its KV blocks are freed at once); returns how many it failed now. A consumer reads ``error`` as the
        stream's next output, from ``accepted()`` or the iteration, as any engine error. For a server whose shutdown
        timeout ran out: a server's loop reads its own requests only, so other loops' streams and ``run()`` go on."""
        loop = asyncio.get_running_loop()
        with self._streams_lock:
            streams = [stream for stream in self._streams if stream._loop is loop]
        return sum(stream._fail(error) for stream in streams)

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float | None = 30.0) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        return self._loop.call(fn, timeout)

    # ---- LoRA adapters ----------------------------------------------------------------------------------------
    def adapters(self) -> dict[str, str]:
        """Name -> path of the LoRA adapters a request may select with ``adapter_name`` (a snapshot)."""
        return dict(self._adapters)

    def update_adapters(self, lora_infos: Mapping[str, str]) -> dict[str, str]:
        """RTP-LLM's ``/update``: the adapters become ``lora_infos`` (changed or absent names removed, new ones
        added) at once, between two engine steps; requests in flight keep the adapter they started with. The files
        are read on this thread. UpdateError (601) when the update cannot be applied; then nothing changes."""
        return self._update(lambda current: dict(lora_infos))

    def add_adapter(self, name: str, path: str) -> dict[str, str]:
        return self._update(lambda current: current | {name: str(path)})

    def remove_adapter(self, name: str) -> dict[str, str]:
        def without(current: dict[str, str]) -> dict[str, str]:
            if name not in current:
                raise UpdateError(f"LoRA adapter {name!r} is not loaded; loaded: {sorted(current)}")
            return {k: v for k, v in current.items() if k != name}

        return self._update(without)

    def _update(self, change: Callable[[dict[str, str]], dict[str, str]]) -> dict[str, str]:
        with self._lora_lock:
            wanted = change(dict(self._adapters))
            remove, add = diff(self._adapters, wanted)
            if not remove and not add:
                return dict(self._adapters)
            self.call(lambda engine: engine.lora.check_update(self._adapters, remove, add))
            loaded = []
            for name, path in add.items():
                try:
                    loaded.append(self._lora_loader.load(name, path))
                except (CheckpointError, ConfigError) as e:
                    raise UpdateError(f"LoRA adapter {name!r}: {e.message}") from e
            self._adapters = self.call(lambda engine: engine.lora.apply(remove, loaded), timeout=None)
            return dict(self._adapters)

    # ---- read-only helpers on the caller's thread ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.processor is None:
            raise InvalidRequest("text needs a tokenizer (this engine was built with skip_tokenizer_init=True)")
        return self.processor.encode(text)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode(self, token_ids: list[int]) -> str:
        """The text of token ids (special tokens included), as an echoed token-id prompt is shown."""
        if self.tokenizer is None:
            raise InvalidRequest("decoding needs a tokenizer (this engine was built with skip_tokenizer_init=True)")
        return self.tokenizer.decode(list(token_ids))

    def embed(self, inputs: Any, is_query: bool = False, case_sensitive: bool = False, attention_mask=None) -> Any:
        """SGPT sentence embeddings (see ``rtp_mm.api.embeddings``)."""
        return embeddings.embed(self, inputs, is_query, case_sensitive, attention_mask)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._loop.alive

    def stats(self) -> dict[str, Any]:
        if not self._loop.alive:
            raise EngineDead("the engine is not running")
        return self.call(lambda engine: engine.stats())

    def shutdown(self) -> None:
        self._loop.shutdown()


class RequestStream:
    """The outputs of one submitted request, read on the event loop that created it.

    The engine's first output is the request's admission: ``accepted()`` waits for it and raises the request's
    error when it was rejected (a server answers that with an HTTP error before any byte of a stream). Iterating
    yields every later output up to the finished one and raises an error output. ``aclose()`` before the end
    cancels the request in the engine, which frees its KV blocks at once; so does ``EngineClient.fail_streams``,
    which ends the stream with an error instead.
    """

    def __init__(self, client: EngineClient, request: EngineRequest):
        loop = asyncio.get_running_loop()
        self.request_id = request.request_id
        self._client = client
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._admitted = False
        self._done = False
        self._failed = False  # by fail_streams: its error is queued and the engine request cancelled
        client.submit(request, lambda out: loop.call_soon_threadsafe(self._queue.put_nowait, out))
        with client._streams_lock:
            client._streams.add(self)

    async def accepted(self) -> None:
        if self._admitted:
            return
        out = await self._queue.get()
        self._admitted = True
        if out.error is not None:
            self._finish()
            raise out.error
        assert out.accepted, "the engine's first output of a request is its admission"

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        await self.accepted()
        if self._done:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.error is not None:
            self._finish()
            raise out.error
        if out.finished:
            self._finish()
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._finish()
            if not self._failed:
                self._client.cancel(self.request_id)

    def _finish(self) -> None:
        self._done = True
        with self._client._streams_lock:
            self._client._streams.discard(self)

    def _fail(self, error: RtpMmError) -> bool:
        """On the stream's loop: ``error`` becomes its next output after those already queued; the engine request
        is cancelled (later outputs of it, if any, are never read)."""
        if self._done or self._failed:
            return False
        self._failed = True
        self._queue.put_nowait(RequestOutput(self.request_id, "", "", [], 0, True, "error", None, {}, error=error))
        self._client.cancel(self.request_id)
        return True
