"""The offline Python API: ``LLM``, a thin layer over one ``EngineClient``.

    llm = LLM(ModelConfig(model_type="llama", ckpt_path=P), kv_cache_mem_mb=256, device="cpu")
    outs = llm.generate(["Hello"], generate_config=GenerateConfig(max_new_tokens=16, top_k=1))
    outs = llm.chat([{"role": "user", "content": "Hi"}])
    async for out in llm.generate_stream("Hello"): ...
    llm.shutdown()

Prompts are a ``str``, a list of ``str`` or a list of token-id lists (used as given: no template, no BOS added).
Images (PIL images, encoded bytes or file paths) are decoded and preprocessed on the caller's threads; the engine
thread encodes them in its encode stage, batched with other requests' images.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

import torch

from rtp_mm.api.embeddings import normalise_prompts
from rtp_mm.api.engine_client import EngineClient
from rtp_mm.api.prompts import PromptProcessor
from rtp_mm.config import EngineConfig, ModelConfig, Settings
from rtp_mm.errors import InvalidRequest
from rtp_mm.llm.engine.engine import RequestOutput
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.request import EngineRequest
from rtp_mm.vision.chat import has_image_parts, load_source, render_image_parts

MAX_IMAGE_THREADS = 8
NO_TOKENIZER = "text prompts need a tokenizer (this LLM was built with skip_tokenizer_init=True)"
NO_TEMPLATE = "this model has no chat template; use generate() with a raw prompt"


class LLM:
    """One model served by one engine thread. Thread-safe: generate() may be called from several threads."""

    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig | None = None,
        skip_tokenizer_init: bool = False,
        **engine_overrides: Any,
    ):
        engine_config = dataclasses.replace(engine_config or EngineConfig(), **engine_overrides)
        self.client = EngineClient(model_config, engine_config, skip_tokenizer_init)
        info = self.client.info
        self.model_config, self.engine_config = info.model_config, info.engine_config
        self.model_type, self.max_seq_len, self.dtype = info.model_type, info.max_seq_len, info.dtype
        self.weight_path = info.weight_path
        self.tokenizer, self.vision = self.client.tokenizer, self.client.vision

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> LLM:
        settings = Settings.from_env(env)
        return cls(settings.model, settings.engine, **overrides)

    # ---- prompts ----------------------------------------------------------------------------------------------
    def _processor(self, missing: str) -> PromptProcessor:
        if self.client.processor is None:
            raise InvalidRequest(missing)
        return self.client.processor

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._processor(NO_TOKENIZER).encode(text, add_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self._processor(NO_TEMPLATE).render_chat(messages, add_generation_prompt)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids of a text-only conversation, through the model's chat template."""
        return self._processor(NO_TEMPLATE).chat_ids(messages)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[Any]]:
        """Prompt ids of one conversation (image parts rendered as the model's placeholders) and its images."""
        ids, _ = self._processor(NO_TEMPLATE).chat_prompt(messages)
        return ids, _chat_images(messages)

    def make_request(
        self,
        prompt: str | Sequence[int] | list[dict[str, Any]],
        generate_config: GenerateConfig | None = None,
        images: Sequence[Any] | None = None,
    ) -> EngineRequest:
        """One request: ``prompt`` is text, token ids or chat messages; ``images`` (PIL images, bytes or paths) fill
        its image placeholders in order and are preprocessed here."""
        return self.client.request(prompt, generate_config, self.client.prepare_images(list(images or ())))

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        generate_config: GenerateConfig | None = None,
        images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (batched by the engine); outputs in prompt order. ``images``: for one
        prompt, its list of images; for several prompts, one list per prompt."""
        items = normalise_prompts(prompts)
        per_prompt: list[Sequence[Any] | None] = [None] * len(items)
        if images is not None:
            per_prompt = [images] if len(items) == 1 and not _is_nested(images) else list(images)
            if len(per_prompt) != len(items):
                raise InvalidRequest(f"images has {len(per_prompt)} entries for {len(items)} prompts")
        return self.client.run(self._requests(items, per_prompt, generate_config))

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        generate_config: GenerateConfig | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the model's chat template is applied. Messages may hold
        image parts (data: URLs, paths, bytes or PIL images), rendered as the model's image placeholders."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        images = [_chat_images(conversation) for conversation in conversations]
        return self.client.run(self._requests(list(conversations), images, generate_config))

    def _requests(
        self, prompts: list[Any], images: list[Sequence[Any] | None], config: GenerateConfig | None
    ) -> list[EngineRequest]:
        """One request per prompt; the images of the whole call are preprocessed on parallel threads."""
        pairs = list(zip(prompts, images, strict=True))
        if sum(1 for _, imgs in pairs if imgs) < 2:
            return [self.make_request(p, config, imgs) for p, imgs in pairs]
        with ThreadPoolExecutor(min(len(pairs), MAX_IMAGE_THREADS), thread_name_prefix="rtp-mm-prepare") as pool:
            return list(pool.map(lambda pair: self.make_request(pair[0], config, pair[1]), pairs))

    async def generate_stream(
        self,
        prompt: str | Sequence[int],
        generate_config: GenerateConfig | None = None,
        images: Sequence[Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one prompt; leaving the iterator early cancels the request. Images are
        preprocessed in a worker thread, not on the event loop."""
        if images:
            req = await asyncio.to_thread(self.make_request, prompt, generate_config, images)
        else:
            req = self.make_request(prompt, generate_config)
        async for out in self.stream_request(req):
            yield out

    async def stream_request(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        async with aclosing(self.client.stream(req)) as stream:
            async for out in stream:
                yield out

    def embed(
        self,
        inputs: str | Sequence[str] | Sequence[Sequence[int]],
        is_query: bool = False,
        case_sensitive: bool = False,
        attention_mask: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """SGPT sentence embeddings [n, hidden] (see ``rtp_mm.api.embeddings.embed``)."""
        return self.client.embed(inputs, is_query, case_sensitive, attention_mask)

    # ---- LoRA adapters (RTP-LLM's LORA_INFO and /update; select one per request with adapter_name) -------------
    def adapters(self) -> dict[str, str]:
        """Name -> path of the adapters a request may select."""
        return self.client.adapters()

    def add_adapter(self, name: str, path: str | os.PathLike) -> dict[str, str]:
        """Load a PEFT LoRA folder under ``name`` (a loaded name is replaced); requests in flight are unaffected."""
        return self.client.add_adapter(name, os.fspath(path))

    def remove_adapter(self, name: str) -> dict[str, str]:
        return self.client.remove_adapter(name)

    def update_adapters(self, lora_infos: dict[str, str]) -> dict[str, str]:
        """The adapters become ``lora_infos`` (name -> path), diffed against the loaded ones as RTP-LLM's /update."""
        return self.client.update_adapters(lora_infos)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def abort(self, request_id: int) -> None:
        self.client.cancel(request_id)

    @property
    def alive(self) -> bool:
        return self.client.alive

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def shutdown(self) -> None:
        self.client.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


def _chat_images(conversation: list[dict[str, Any]]) -> list[Any]:
    """The images of a conversation's image parts, in placeholder order (data: URLs decoded to bytes)."""
    if not has_image_parts(conversation):
        return []
    _, sources = render_image_parts(conversation, lambda k: "")
    return [load_source(src, k) for k, src in enumerate(sources)]


def _is_nested(images: Sequence[Any]) -> bool:
    """True when ``images`` is one list of images per prompt (not one prompt's images)."""
    return bool(images) and all(isinstance(x, list | tuple) for x in images)
