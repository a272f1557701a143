"""The offline API and the engine client: how Python code and the HTTP server reach the engine.

- ``builder``: configuration -> the engine's parts (model, weight transforms, vision encoder, tokenizer, KV size).
- ``engine_client.EngineClient``: the one way into a running engine from any thread (submit, stream, cancel, stats).
- ``llm.LLM``: the thin offline API over one EngineClient (generate, chat, embed, generate_stream).
- ``prompts.PromptProcessor``: text and chats -> prompt token ids, run by the engine at admission.
"""

from rtp_mm.api.engine_client import EngineClient, RequestStream
from rtp_mm.api.llm import LLM
from rtp_mm.api.prompts import ChatPrompt
from rtp_mm.llm.engine.engine import RequestOutput
from rtp_mm.llm.engine.generate_config import MAX_LOGPROBS, GenerateConfig
from rtp_mm.llm.engine.request import EngineRequest

# The engine's vocabulary that callers of the client use (the server imports it from here, never from rtp_mm.llm).
__all__ = [
    "LLM",
    "ChatPrompt",
    "EngineClient",
    "RequestStream",
    "EngineRequest",
    "RequestOutput",
    "GenerateConfig",
    "MAX_LOGPROBS",
]
