"""LoRA adapters on the wire: RTP-LLM's ``POST /update`` and the adapters' place in the OpenAI routes.

``POST /update`` takes RTP-LLM's ``VersionInfo`` body, ``{"peft_info": {"lora_info": {name: path}}}`` (its
``models_info`` and ``sampler_info`` are accepted and ignored), and makes the loaded adapters exactly that map: the
engine client diffs it against the loaded one, removing changed or absent names and adding new ones at once. As in
RTP-LLM a body without ``peft_info`` removes every adapter. Any failure (a path that is no PEFT LoRA folder, more
adapters than ``MAX_LORA_MODEL_SIZE``, an adapter merged at start-up) is ``601`` (HTTP 400) and changes nothing.
Paths are read on the server's machine: behind ``API_KEY`` like every other route.

On the OpenAI routes an adapter is a model: ``/v1/models`` lists each beside the base model, and a request whose
``model`` names one runs with that adapter (``extra_configs.adapter_name`` wins when both are given); any other
``model`` is the base model, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StrictStr

from rtp_mm.api.engine_client import EngineClient
from rtp_mm.errors import UpdateError
from rtp_mm.server.intake import read_body
from rtp_mm.server.state import ENGINE_KEY
from rtp_mm.server.wire import validated


class PeftInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    lora_info: dict[StrictStr, StrictStr] = {}


class UpdateBody(BaseModel):
    """The body of ``POST /update``: RTP-LLM's VersionInfo."""

    model_config = ConfigDict(extra="allow")

    peft_info: PeftInfo | None = None
    models_info: Any = None
    sampler_info: Any = None


async def handle_update(request: web.Request) -> web.Response:
    body, _ = await read_body(request)
    if not isinstance(body, dict):
        raise UpdateError(f"request body must be a JSON object, got {type(body).__name__}")
    update = validated(UpdateBody, body, lambda error: UpdateError(error.message))
    lora_info = update.peft_info.lora_info if update.peft_info is not None else {}
    # Reads the adapter folders on a worker thread, then waits for the engine to apply the update between steps.
    adapters = await asyncio.to_thread(request.app[ENGINE_KEY].update_adapters, lora_info)
    return web.json_response({"status": "ok", "lora_info": adapters})


def adapter_models(engine: EngineClient, base: dict[str, Any]) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the adapters, children of the ``base`` model entry."""
    return [{**base, "id": name, "root": base["id"], "parent": base["id"]} for name in engine.adapters()]


def adapter_for_model(engine: EngineClient, model: str | None, adapter_name: str | None) -> str | None:
    """The adapter an OpenAI request runs with: its ``extra_configs.adapter_name``, else ``model`` when that names
    a loaded adapter."""
    if adapter_name is not None or model is None:
        return adapter_name
    return model if model in engine.adapters() else None
