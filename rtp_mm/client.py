"""Python client of the rtp-mm server: ``AsyncClient`` (aiohttp) and ``Client`` (the same, blocking).

    with Client("http://127.0.0.1:8088") as client:
        client.wait_until_ready()
        out = client.generate("Hello", max_new_tokens=16, top_k=1)          # native POST /
        for event in client.stream("Hello", max_new_tokens=16):            # incremental text
            print(event.text, end="")
        out = client.generate("Describe this.", images=["cat.png"])         # paths, bytes or PIL images
        reply = client.chat([{"role": "user", "content": "Hi"}], max_tokens=16)   # /v1/chat/completions

Images (paths, ``bytes`` or PIL images; in ``chat`` as an ``image_url.url`` or an ``{"type": "image", "image": x}``
part) are sent by multipart/form-data upload and referenced as ``upload://<part>``; strings starting with
``http://``, ``https://`` or ``data:`` are sent as they are. Server errors raise ``ServerError`` subclasses carrying
the HTTP status and RTP-LLM's ``error_code``, also when the error arrives inside a stream.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")
_REFERENCE_PREFIXES = ("http://", "https://", "data:", "upload://")


class ServerError(Exception):
    """An error answer of the server. ``error_code`` is RTP-LLM's code (e.g. 507 bad input, 513 busy)."""

    def __init__(self, status: int, error_code: int | None, message: str, body: Any = None):
        super().__init__(f"HTTP {status}, error_code {error_code}: {message}")
        self.status, self.error_code, self.message, self.body = status, error_code, message, body


class BadRequestError(ServerError):
    """The request was wrong (HTTP 400/404/413/422): fix it, do not retry it."""


class AuthenticationError(ServerError):
    """HTTP 401: the API key is missing or wrong."""


class ConcurrencyLimitError(ServerError):
    """HTTP 409 / error 513: the server has CONCURRENCY_LIMIT requests in flight; retry later."""


class GenerationTimeoutError(ServerError):
    """Error 603: the request's own timeout_ms ran out."""


class ServiceUnavailableError(ServerError):
    """HTTP 501/503: not implemented yet, or the engine is down."""


def _error_class(status: int, error_code: int | None) -> type[ServerError]:
    if status == 401:
        return AuthenticationError
    if status == 409 or error_code == 513:
        return ConcurrencyLimitError
    if error_code == 603:
        return GenerationTimeoutError
    if status in (501, 503):
        return ServiceUnavailableError
    if 400 <= status < 500:
        return BadRequestError
    return ServerError


def error_from_body(status: int, body: Any) -> ServerError:
    """Native ``{"error_code", "message"}`` and OpenAI ``{"error": {"message", "code"}}`` bodies alike."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        inner = body["error"]
        code, message = inner.get("code"), inner.get("message", "")
    elif isinstance(body, dict):
        code, message = body.get("error_code"), body.get("message", "")
    else:
        code, message = None, str(body)
    code = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else None
    return _error_class(status, code)(status, code, str(message), body)


@dataclass
class Generation:
    """One native answer or stream event. With ``num_return_sequences`` > 0, ``text``/``aux_info`` are lists."""

    text: str | list[str]
    finished: bool
    aux_info: dict[str, Any] | list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Generation:
        return cls(body["response"], body["finished"], body.get("aux_info", {}), body)


@dataclass
class ChatResult:
    """The first choice of a chat completion, plus the whole body."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format=image.format or "PNG")
        return buf.getvalue()
    raise TypeError(f"an image must be a path, bytes or a PIL image, got {type(image).__name__}")


class _Uploads:
    """Collects images to upload; ``ref`` returns what the JSON should say for one image."""

    def __init__(self) -> None:
        self.parts: dict[str, bytes] = {}

    def ref(self, image: Any) -> str:
        if isinstance(image, str) and image.startswith(_REFERENCE_PREFIXES):
            return image
        name = f"image{len(self.parts)}"
        self.parts[name] = _image_bytes(image)
        return f"upload://{name}"

    def form(self, body: dict[str, Any]) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("request", json.dumps(body), content_type="application/json")
        for name, data in self.parts.items():
            form.add_field(name, data, filename=name, content_type="application/octet-stream")
        return form


class AsyncClient:
    """An aiohttp client of one server. Use as ``async with`` or call ``close()``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8088", api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=self.timeout)
        return self._session

    async def _post(self, path: str, body: dict[str, Any], uploads: _Uploads | None = None) -> aiohttp.ClientResponse:
        data = uploads.form(body) if uploads and uploads.parts else None
        kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        resp = await self._http().post(self.base_url + path, **kwargs)
        if resp.status >= 400:
            raise await _error_of(resp)
        return resp

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None, uploads=None) -> Any:
        if method == "GET":
            async with self._http().get(self.base_url + path) as resp:
                if resp.status >= 400:
                    raise await _error_of(resp)
                return await resp.json(content_type=None)
        resp = await self._post(path, body or {}, uploads)
        async with resp:
            return await resp.json(content_type=None)

    @staticmethod
    def _native_body(prompt: str | list[str], images: list[Any] | None, gen: dict[str, Any]) -> tuple[dict, _Uploads]:
        uploads = _Uploads()
        body: dict[str, Any] = {"prompt_batch": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        body.update(gen)
        if images:
            if isinstance(prompt, list):  # one list per prompt
                body["images"] = [[uploads.ref(im) for im in group] for group in images]
            else:
                body["images"] = [uploads.ref(im) for im in images]
        return body, uploads

    async def generate(
        self, prompt: str | list[str], images: list[Any] | None = None, **gen: Any
    ) -> Generation | list[Generation]:
        """Native ``POST /``; ``gen`` holds GenerateConfig fields. A list of prompts answers a list."""
        body, uploads = self._native_body(prompt, images, gen)
        data = await self._json("POST", "/", body, uploads)
        if isinstance(prompt, list):
            return [Generation.from_body(b) for b in data["response_batch"]]
        return Generation.from_body(data)

    async def stream(self, prompt: str, images: list[Any] | None = None, **gen: Any) -> AsyncIterator[Generation]:
        """Native streaming; each event's ``text`` is what is new since the previous event."""
        body, uploads = self._native_body(prompt, images, {**gen, "yield_generator": True, "return_incremental": True})
        resp = await self._post("/", body, uploads)
        async with resp:
            async for payload in _sse_payloads(resp):
                yield Generation.from_body(payload)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """``POST /v1/chat/completions`` (OpenAI parameters: max_tokens, temperature, seed, stop, ...)."""
        uploads = _Uploads()
        body = {"model": params.pop("model", "rtp-mm"), "messages": _upload_message_images(messages, uploads), **params}
        data = await self._json("POST", "/v1/chat/completions", body, uploads)
        choice = data["choices"][0]
        return ChatResult(choice["message"]["content"], choice["finish_reason"], data.get("usage", {}), data)

    async def embed(self, inputs: str | list[str], **params: Any) -> list[list[float]]:
        body = {"model": params.pop("model", "rtp-mm"), "input": inputs, **params}
        data = await self._json("POST", "/v1/embeddings", body)
        return [item["embedding"] for item in sorted(data["data"], key=lambda d: d["index"])]

    async def worker_status(self) -> dict[str, Any]:
        return await self._json("GET", "/worker_status")

    async def health(self) -> bool:
        try:
            return await self._json("GET", "/health") == "ok"
        except (aiohttp.ClientError, ServerError, asyncio.TimeoutError):
            return False

    async def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.25) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await self.health():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.base_url} was not healthy within {timeout} s")
            await asyncio.sleep(interval)


def _upload_message_images(messages: list[dict[str, Any]], uploads: _Uploads) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    part = {"type": "image_url", "image_url": {"url": part["image"]}}
                if part.get("type") == "image_url":
                    image = part["image_url"]
                    url = image.get("url") if isinstance(image, dict) else image
                    part = {"type": "image_url", "image_url": {"url": uploads.ref(url)}}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


async def _error_of(resp: aiohttp.ClientResponse) -> ServerError:
    text = await resp.text()
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    resp.release()
    return error_from_body(resp.status, body)


async def _sse_payloads(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """JSON payloads of ``data:`` events until ``[done]``/``[DONE]``; an error event raises."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload in ("[done]", "[DONE]"):
            return
        event = json.loads(payload)
        if "error" in event or ("error_code" in event and "response" not in event):
            raise error_from_body(resp.status, event)
        yield event


class Client:
    """The blocking twin of ``AsyncClient``: the same methods, run on a private event-loop thread."""

    def __init__(self, base_url: str = "http://127.0.0.1:8088", api_key: str | None = None, timeout: float = 600.0):
        self._async = AsyncClient(base_url, api_key, timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rtp-mm-client", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | list[str], images: list[Any] | None = None, **gen: Any) -> Any:
        return self._run(self._async.generate(prompt, images, **gen))

    def stream(self, prompt: str, images: list[Any] | None = None, **gen: Any) -> Iterator[Generation]:
        events = self._async.stream(prompt, images, **gen)
        try:
            while True:
                try:
                    yield self._run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())  # leaving early closes the connection, which cancels the request

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        return self._run(self._async.chat(messages, **params))

    def embed(self, inputs: str | list[str], **params: Any) -> list[list[float]]:
        return self._run(self._async.embed(inputs, **params))

    def worker_status(self) -> dict[str, Any]:
        return self._run(self._async.worker_status())

    def health(self) -> bool:
        return self._run(self._async.health())

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        self._run(self._async.wait_until_ready(timeout))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
