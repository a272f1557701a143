"""Handlers of the OpenAI routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``. Parsing and shapes live in ``openai_protocol``; errors use OpenAI's shape (see ``errors``).

Streams are ``data: <json>\\n\\n`` events ending with ``data: [DONE]``. Per choice: a first chunk with
``delta.role``, content chunks, then a chunk with ``finish_reason``; with ``stream_options.include_usage`` every
chunk has ``usage: null`` and one last chunk has ``choices: []`` and the usage. An error after the headers were
sent is one ``data: {"error": {...}}`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from contextlib import aclosing
from typing import Any

import torch
from aiohttp import web

from rtp_mm.api import ChatPrompt, EngineRequest, RequestOutput
from rtp_mm.api.engine_client import EngineClient
from rtp_mm.errors import InvalidRequest, RtpMmError
from rtp_mm.server.adapters import adapter_for_model, adapter_models
from rtp_mm.server.errors import InvalidParam, describe_error, openai_error_body
from rtp_mm.server.generation import RequestGroup
from rtp_mm.server.intake import load_images, read_body, sequence_slots
from rtp_mm.server.openai_protocol import (
    OpenAIRequest,
    chat_logprobs,
    completion_logprobs,
    embedding_inputs,
    joined_logprobs,
    new_id,
    now,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
    usage,
)
from rtp_mm.server.protocol import dumps
from rtp_mm.server.state import ENGINE_KEY, METRICS_KEY, MODEL_NAME_KEY
from rtp_mm.server.tools import ToolCall

logger = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


def _event(body: Any) -> bytes:
    return b"data: " + dumps(body).encode() + b"\n\n"


class _Answer:
    """Turns engine outputs of one OpenAI request into choices (chat or text completion)."""

    def __init__(
        self, engine: EngineClient, parsed: OpenAIRequest, requests: list[EngineRequest], chat: bool, model: str
    ):
        self.engine, self.parsed, self.requests, self.chat, self.model = engine, parsed, requests, chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"
        self.text_offsets = [0] * len(requests)
        self.echoed = [not parsed.echo] * len(requests)  # echo: whether choice i has sent its prompt yet

    def token_text(self, token: int) -> str:
        return self.engine.token_text(token)

    def _tokens(self, index: int, out: RequestOutput, new_only: bool) -> tuple[list[int], list[dict[int, float]]]:
        """Generated ids with their logprob entries, without an EOS that ended the request (it has no text; with echo
        it is kept, as vLLM does: clients slice the generated tokens' logprobs by the prompt's length)."""
        ids, lps = out.token_ids, out.logprobs or []
        ended_by_eos = out.finished and out.finish_reason == "stop" and ids and ids[-1] in self.eos_token_ids(index)
        if ended_by_eos and not self.parsed.echo:
            ids, lps = ids[:-1], lps[:-1]
        if new_only:
            start = len(out.token_ids) - out.num_new_tokens
            ids, lps = ids[start:], lps[start:]
        return ids, lps

    def eos_token_ids(self, index: int) -> frozenset[int]:
        """The ids that end request ``index`` (its own eos_token_id, or the model's), which carry no text."""
        config = self.requests[index].config
        if config.ignore_eos:
            return frozenset()
        return frozenset({config.eos_token_id}) if config.eos_token_id is not None else self.engine.info.eos_token_ids

    def logprobs(self, index: int, out: RequestOutput, new_only: bool = False) -> dict[str, Any] | None:
        top = self.parsed.logprobs
        if top is None:
            return None
        ids, lps = self._tokens(index, out, new_only)
        if self.chat:
            return chat_logprobs(self.token_text, ids, lps, top)
        result = completion_logprobs(self.token_text, ids, lps, top, self.text_offsets[index])
        self.text_offsets[index] += sum(len(t) for t in result["tokens"])
        return result

    def echo(self, index: int, out: RequestOutput) -> tuple[str, dict[str, Any] | None]:
        """Once per choice, before its first generated text: the prompt's text and, with logprobs, its tokens'."""
        self.echoed[index] = True
        prompt = self.requests[index].prompt
        text = prompt if isinstance(prompt, str) else self.engine.decode(prompt)
        top = self.parsed.logprobs
        if top is None or out.prompt_token_ids is None:
            return text, None
        result = completion_logprobs(self.token_text, out.prompt_token_ids, out.prompt_logprobs, top)
        self.text_offsets[index] += sum(len(t) for t in result["tokens"])
        return text, result

    def tool_calls(self, out: RequestOutput) -> tuple[str | None, list[dict[str, Any]], str | None]:
        """(content, tool calls, finish_reason) of a finished chat answer."""
        content, calls = self.parsed.tools.calls(out.text, self.engine.info.model_type.family)
        reason = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
        return content, [call.wire() for call in calls], reason

    def body(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for index, out in enumerate(outs):
            choice: dict[str, Any] = {"index": index}
            reason = out.finish_reason
            if self.chat:
                choice["message"] = {"role": "assistant", "content": out.text, "refusal": None}
                if self.parsed.tools.kind != "none":
                    content, calls, reason = self.tool_calls(out)
                    choice["message"]["content"] = content
                    if calls:
                        choice["message"]["tool_calls"] = calls
            else:
                prompt_text, prompt_logprobs = ("", None) if self.echoed[index] else self.echo(index, out)
                choice["text"] = prompt_text + out.text
            choice["logprobs"] = self.logprobs(index, out)
            if not self.chat and self.parsed.echo:
                choice["logprobs"] = joined_logprobs(prompt_logprobs, choice["logprobs"])
            choice["finish_reason"] = reason
            choices.append(choice)
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(outs, self.parsed.n),
        }

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": f"{self.object}.chunk" if self.chat else self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    @property
    def buffered(self) -> bool:
        """Tool calls read from the whole answer (auto, required): nothing streams until it is finished."""
        return self.chat and self.parsed.tools.kind in ("auto", "required")

    def delta_choice(
        self, index: int, text: str, out: RequestOutput | None, finish: str | None
    ) -> dict[str, Any] | None:
        """A streamed choice: the role (``out`` None), new text, or the finish; None when nothing is to be sent."""
        if self.buffered and out is not None and not finish:
            return None
        # The first chunk of an echoed choice carries the prompt (with max_tokens 0, the finish chunk does).
        echoed = self.echo(index, out) if out is not None and not self.echoed[index] else ("", None)
        logprobs = None if out is None or finish else self.logprobs(index, out, new_only=True)
        if not self.chat:
            text, logprobs = echoed[0] + text, joined_logprobs(echoed[1], logprobs)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish:
            reason = self.tool_calls(out)[2] if out is not None and self.parsed.tools.kind != "none" else finish
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        named = self.parsed.tools.kind == "named"
        if out is None:
            delta: dict[str, Any] = {"role": "assistant", "content": None if named else ""}
            if named:  # the call's header first; its arguments then stream as they are generated
                delta["tool_calls"] = [ToolCall(self.parsed.tools.name or "", "").wire(0)]
        else:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if named else {"content": text}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    def final_delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        """For a buffered answer: its content or tool calls, sent once it finished."""
        if not self.buffered:
            return None
        content, calls, _ = self.tool_calls(out)
        delta: dict[str, Any] = {"content": content}
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def _model_name(request: web.Request, parsed: OpenAIRequest) -> str:
    return parsed.model or request.app[MODEL_NAME_KEY]


async def handle_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    info = engine.info
    model = {
        "id": request.app[MODEL_NAME_KEY],
        "object": "model",
        "created": 0,
        "owned_by": "rtp-mm",
        "root": request.app[MODEL_NAME_KEY],  # never the absolute path: /v1/models may be public
        "max_model_len": info.max_seq_len,
        "model_type": info.model_type.name,  # rtp-mm's additions (the playground reads them)
        "vision": engine.vision is not None,
    }
    return web.json_response({"object": "list", "data": [model, *adapter_models(engine, model)]}, dumps=dumps)


def _make_requests(engine: EngineClient, parsed: OpenAIRequest, images: list[Any]) -> list[EngineRequest]:
    """One engine request per (prompt, sample). A chat is sent as its messages: the engine renders the template,
    each image part becoming the model's placeholder for the next of ``images`` (decoded and prepared in order)."""
    tools = parsed.tools
    chat = ChatPrompt(parsed.messages, tools.render_tools, need_tool_template=tools.kind == "auto")
    prompts: list[Any] = [chat] if parsed.messages else parsed.prompts
    configs = parsed.sequence_configs()
    adapter = adapter_for_model(engine, parsed.model, parsed.config.adapter_name)
    if adapter != parsed.config.adapter_name:  # `model` names a LoRA adapter (server/adapters.py)
        configs = [config.updated(adapter_name=adapter) for config in configs]
    return [engine.request(prompt, config, images) for prompt in prompts for config in configs]


async def _serve(request: web.Request, parsed: OpenAIRequest, uploads: dict[str, bytes], chat: bool):
    app = request.app
    engine = app[ENGINE_KEY]
    with sequence_slots(request, parsed.total_sequences):
        images = await load_images(request, parsed.image_refs, uploads)
        requests = _make_requests(engine, parsed, images)
        answer = _Answer(engine, parsed, requests, chat, _model_name(request, parsed))
        async with RequestGroup(engine, requests, app[METRICS_KEY]) as group:
            try:
                await group.accepted()  # a rejected prompt is an HTTP error, before any byte of a stream
            except InvalidRequest as e:
                raise InvalidParam(e.message, "messages" if chat else "prompt", e.error_code) from None
            if parsed.stream:
                return await _stream(request, answer, group)
            outs = await group.finals()
        return web.json_response(answer.body(outs), dumps=dumps)


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    body, uploads = await read_body(request)
    return await _serve(request, parse_chat_request(body), uploads, chat=True)


async def handle_completions(request: web.Request) -> web.StreamResponse:
    body, uploads = await read_body(request)
    return await _serve(request, parse_completion_request(body), uploads, chat=False)


async def _stream(request: web.Request, answer: _Answer, group: RequestGroup) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    finals: list[RequestOutput | None] = [None] * len(answer.requests)
    try:
        if answer.chat:
            roles = [answer.delta_choice(i, "", None, None) for i in range(len(answer.requests))]
            await resp.write(_event(answer.chunk(roles)))
        async with aclosing(group.outputs()) as outputs:
            async for index, out in outputs:
                if out.num_new_tokens:
                    choice = answer.delta_choice(index, out.delta_text, out, None)
                    lp = choice and choice["logprobs"]
                    has_logprobs = lp is not None and (lp.get("content") or lp.get("tokens"))
                    # A token with no text yet (a split character, a stop-string prefix, the EOS) sends nothing;
                    # an echoed prompt's chunk always goes.
                    if choice and (out.delta_text or choice.get("text") or has_logprobs):
                        await resp.write(_event(answer.chunk([choice])))
                if out.finished:
                    finals[index] = out
                    if (final := answer.final_delta(index, out)) is not None:
                        await resp.write(_event(answer.chunk([final])))
                    finish = answer.delta_choice(index, "", out, out.finish_reason)
                    await resp.write(_event(answer.chunk([finish])))
        if answer.parsed.include_usage:
            chunk = answer.chunk([])
            chunk["usage"] = usage([o for o in finals if o is not None], answer.parsed.n)
            await resp.write(_event(chunk))
        await resp.write(DONE)
    except ConnectionResetError:
        logger.info("client %s closed its stream: its requests are cancelled (499)", request.remote)
    except Exception as e:
        if not isinstance(e, RtpMmError):
            logger.exception("stream failed with an unexpected error")
        status, body = describe_error(e)
        try:
            await resp.write(_event(openai_error_body(status, body)) + DONE)
        except ConnectionResetError:
            pass
    return resp


def _encode_vector(vector: Any, encoding: str) -> list[float] | str:
    """OpenAI's two encodings: a JSON list of floats, or base64 of the little-endian float32 bytes (what the official
    client asks for by default)."""
    if encoding == "base64":
        return base64.b64encode(vector.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


async def handle_embeddings(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    data, _ = await read_body(request)
    model_type = engine.info.model_type
    if not model_type.embedding:
        raise InvalidParam(
            f"MODEL_TYPE={model_type.name} is a generative model, not an embedding model: /v1/embeddings needs "
            "an embedding MODEL_TYPE (e.g. sgpt_bloom_vector)",
            "model",
        )
    body = parse_embedding_request(data)
    inputs = embedding_inputs(body)
    with sequence_slots(request, 1):  # one engine call, whatever the number of inputs
        vectors = await asyncio.to_thread(engine.embed, inputs, body.is_query)
    num_tokens = sum(len(engine.tokenize(t)) if isinstance(t, str) else len(t) for t in inputs)
    data = [
        {"object": "embedding", "embedding": _encode_vector(vector, body.encoding_format), "index": i}
        for i, vector in enumerate(vectors)
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body.model or request.app[MODEL_NAME_KEY],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        },
        dumps=dumps,
    )
