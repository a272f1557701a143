"""The path of a request through threads and stages, as docs/ARCHITECTURE.md ("The path of a request") describes it.

A text request crosses two threads: the event loop parses it, the engine thread tokenizes, admits, prefills and
decodes it, the event loop answers. An image request adds one hop before the engine: its image is decoded, hashed
and preprocessed in the server's image pool; the engine thread then encodes it in its encode stage (no round trip
back to a worker) before admitting the expanded prompt.

Each stage's function is wrapped to record (stage, thread) as it runs; consecutive repeats (one ``run`` per engine
step) are collapsed, so the recorded sequence is the path.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.request
from collections.abc import Callable

import pytest

from rtp_mm import LLM, ModelConfig
from rtp_mm.api.prompts import PromptProcessor
from rtp_mm.llm.engine.engine import LLMEngine
from rtp_mm.llm.engine.model_runner import ModelRunner
from rtp_mm.llm.engine.multimodal import EncodeStage
from rtp_mm.server import native
from rtp_mm.server.images import ImageIntake
from rtp_mm_testing.fake_vision import IMAGE_TOKEN, MODEL_TYPE, make_checkpoint, picture, registered
from rtp_mm_testing.serving import background_server

LOOP, ENGINE, POOL = "event loop", "engine", "image pool"
THREADS = {"rtp-mm-server": LOOP, "rtp-mm-engine": ENGINE}  # BackgroundServer's loop, EngineLoop's thread


def _kind(name: str) -> str:
    return POOL if name.startswith("rtp-mm-image") else THREADS.get(name, name)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with registered():
        path = tmp_path_factory.mktemp("request_path")
        make_checkpoint(path, seed=15)
        llm = LLM(ModelConfig(model_type=MODEL_TYPE, ckpt_path=str(path), weight_type="FP32"), kv_cache_mem_mb=16)
    with background_server(llm, owns_llm=True) as url:
        yield url


@pytest.fixture
def trace(monkeypatch) -> list[tuple[str, str]]:
    """(stage, thread kind) of every traced call, in order."""
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def wrap(owner: object, attribute: str, stage: str) -> None:
        original: Callable = getattr(owner, attribute)

        def traced(*args, **kwargs):
            with lock:
                seen.append((stage, _kind(threading.current_thread().name)))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, traced)

    wrap(native, "parse_native_request", "parse")
    wrap(ImageIntake, "_decode", "decode, hash, preprocess")
    wrap(PromptProcessor, "__call__", "tokenize")
    wrap(EncodeStage, "_encode", "encode")
    wrap(LLMEngine, "_admit", "admit")
    wrap(ModelRunner, "execute", "prefill, decode")
    wrap(native, "response_body", "answer")
    return seen


def _path(seen: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [step for i, step in enumerate(seen) if i == 0 or step != seen[i - 1]]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def test_a_text_request_crosses_only_the_event_loop_and_the_engine_thread(url, trace):
    out = _post(url, {"prompt": "Describe the picture.", "top_k": 1, "max_new_tokens": 4, "ignore_eos": True})
    assert out["finished"] and out["aux_info"]["output_len"] == 4
    assert _path(trace) == [
        ("parse", LOOP),
        ("tokenize", ENGINE),
        ("admit", ENGINE),
        ("prefill, decode", ENGINE),
        ("answer", LOOP),
    ]


def test_an_image_request_is_prepared_in_the_pool_and_encoded_by_the_engine(url, trace):
    buf = io.BytesIO()
    picture(3).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": IMAGE_TOKEN + " Describe it.", "images": [image], "top_k": 1, "max_new_tokens": 4}
    out = _post(url, {**body, "ignore_eos": True})
    assert out["finished"] and out["aux_info"]["output_len"] == 4
    assert _path(trace) == [
        ("parse", LOOP),
        ("decode, hash, preprocess", POOL),
        ("tokenize", ENGINE),
        ("encode", ENGINE),
        ("admit", ENGINE),
        ("prefill, decode", ENGINE),
        ("answer", LOOP),
    ]
