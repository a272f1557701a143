"""Image intake on the real server (aiohttp test server on a free port): base64 / data: URLs, multipart uploads
referenced as ``upload://<part>``, local paths and remote URLs (off by default), limits with clear 4xx errors.

The tiny model is text-only, so a request whose images are all valid ends in the 400 "text-only" answer, and every
other answer shows which intake check fired. Oracle: Pillow (encoding the test images), the documented limits.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import aiohttp
import pytest
from PIL import Image

import rtp_mm.server.images as images_module
from rtp_mm import LLM, ModelConfig, Settings
from rtp_mm.server.app import create_app
from rtp_mm.server.images import ImageIntake, ImageLimits, _is_public
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import server_settings

GREEDY = {"top_k": 1, "max_new_tokens": 1}


def _png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_images")
    tiny_llama(path, seed=4)
    tiny_bpe_tokenizer(path, ["Describe the picture.", "Hello world"], chat_template="{{ messages[0]['content'] }}")
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=128), kv_cache_mem_mb=8)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    (path / "ok.png").write_bytes(_png())
    return path


def _settings(llm: LLM, **server) -> Settings:
    limits = dict(image_max_count=2, image_max_mb=1, image_max_pixels=64 * 64, max_body_mb=4)
    return server_settings(llm, **{**limits, **server})


@pytest.fixture
async def client(aiohttp_client, llm, image_dir):
    return await aiohttp_client(create_app(llm.client, _settings(llm, image_local_dir=str(image_dir))))


def _form(body: dict, parts: dict[str, bytes], request_part: str = "request") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(request_part, json.dumps(body), content_type="application/json")
    for name, data in parts.items():
        form.add_field(name, data, filename=name, content_type="application/octet-stream")
    return form


async def _check(client, resp, status: int, text: str, path: str = "/") -> None:
    data = await resp.json()
    body = data["error"] if path.startswith("/v1/") else data
    code = body["code"] if path.startswith("/v1/") else body["error_code"]
    assert (resp.status, code) == (status, 507), data
    assert text in body["message"], data
    ok = await client.post("/", json={"prompt": "Hello", **GREEDY})  # the server keeps serving
    assert ok.status == 200


TEXT_ONLY = "text-only"
NATIVE_CASES = {
    "valid-data-url": ([_data_url(_png())], 400, TEXT_ONLY),
    "valid-bare-base64": ([base64.b64encode(_png()).decode()], 400, TEXT_ONLY),
    "valid-local-path": (["ok.png"], 400, TEXT_ONLY),
    "bad-base64": (["data:image/png;base64,@@@not-base64@@@"], 400, "invalid base64"),
    "not-base64-nor-anything": (["%%%"], 400, "neither a data: URL"),
    "data-url-not-image-mime": ([_data_url(b"hello", "text/plain")], 422, "not an image"),
    "base64-of-non-image": ([_data_url(b"definitely not a png")], 422, "not a decodable image"),
    "truncated-png": ([_data_url(_png(32, 32)[:60])], 422, "not a decodable image"),
    "too-many-images": ([_data_url(_png())] * 3, 400, "IMAGE_MAX_COUNT"),
    "too-many-pixels": ([_data_url(_png(100, 100))], 413, "IMAGE_MAX_PIXELS"),
    "oversize-bytes": ([base64.b64encode(b"\0" * (2**20 + 1)).decode()], 413, "IMAGE_MAX_MB"),
    "http-url-while-disabled": (["http://example.com/cat.png"], 400, "IMAGE_URL_HOSTS"),
    "unsupported-scheme": (["ftp://example.com/cat.png"], 400, "scheme 'ftp'"),
    "path-traversal": (["../images/../../etc/passwd"], 400, "outside IMAGE_LOCAL_DIR"),
    "absolute-path-outside": (["/etc/hostname"], 400, "outside IMAGE_LOCAL_DIR"),
    "missing-local-file": (["nope.png"], 400, "no file"),
    "unknown-upload-reference": (["upload://nothing"], 400, "names no uploaded part"),
    "image-not-a-string": ([5], 400, "images[0]=5: input should be a valid string"),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
async def test_native_images(client, case):
    images, status, text = NATIVE_CASES[case]
    resp = await client.post("/", json={"prompt": "Describe the picture.", "images": images, **GREEDY})
    await _check(client, resp, status, text)


async def test_decoding_runs_off_the_event_loop(client, monkeypatch):
    threads = []
    real = images_module.decode_image

    def recording(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(images_module, "decode_image", recording)
    resp = await client.post("/", json={"prompt": "Hi", "images": [_data_url(_png())] * 2, **GREEDY})
    await _check(client, resp, 400, TEXT_ONLY)
    assert len(threads) == 2 and all(name.startswith("rtp-mm-image") for name in threads)


UPLOAD_CASES = {
    "valid-upload": ({"images": ["upload://cat"]}, {"cat": _png()}, 400, TEXT_ONLY),
    "two-uploads-one-batch": (
        {"prompt_batch": ["a", "b"], "images": [["upload://a"], ["upload://b"]]},
        {"a": _png(), "b": _png()},
        400,
        TEXT_ONLY,
    ),
    "non-image-upload": ({"images": ["upload://doc"]}, {"doc": b"%PDF-1.4 not an image"}, 422, "not a decodable"),
    "oversize-upload": ({"images": ["upload://big"]}, {"big": b"\0" * (2**20 + 10)}, 413, "IMAGE_MAX_MB"),
    "unreferenced-upload": ({"images": []}, {"cat": _png()}, 400, "not referenced"),
    "unknown-reference": ({"images": ["upload://dog"]}, {"cat": _png()}, 400, "names no uploaded part"),
}


@pytest.mark.parametrize("case", list(UPLOAD_CASES))
async def test_multipart_uploads(client, case):
    body, parts, status, text = UPLOAD_CASES[case]
    body = {"prompt": "Describe the picture.", **GREEDY, **body}
    resp = await client.post("/", data=_form(body, parts))
    await _check(client, resp, status, text)


async def test_multipart_text_only_request_generates(client, llm):
    resp = await client.post("/", data=_form({"prompt": "Hello", **GREEDY}, {}))
    assert resp.status == 200 and (await resp.json())["aux_info"]["output_len"] == 1


async def test_multipart_without_request_part(client):
    resp = await client.post("/", data=_form({"prompt": "Hello"}, {"cat": _png()}, request_part="json"))
    await _check(client, resp, 400, "part named 'request'")


async def test_body_over_max_body_mb(client):
    resp = await client.post("/", json={"prompt": "x" * (5 * 2**20)})
    assert resp.status == 413 and (await resp.json())["error_code"] == 507
    parts = {f"p{i}": b"\0" * (2**20 - 100) for i in range(5)}  # each under IMAGE_MAX_MB, together over 4 MiB
    resp = await client.post(
        "/", data=_form({"prompt": "Hello", "images": [f"upload://p{i}" for i in range(5)]}, parts)
    )
    await _check(client, resp, 413, "MAX_BODY_MB")


async def test_chat_image_url_parts(client):
    part = {"type": "image_url", "image_url": {"url": _data_url(_png())}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."}, part]}]
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 1})
    await _check(client, resp, 400, TEXT_ONLY, "/v1/chat")
    upload = {"type": "image_url", "image_url": {"url": "upload://cat"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [upload]}], "max_tokens": 1}
    resp = await client.post("/v1/chat/completions", data=_form(body, {"cat": b"GIF89a broken"}))
    await _check(client, resp, 422, "not a decodable", "/v1/chat")


async def test_remote_urls_are_restricted(aiohttp_client, llm):
    client = await aiohttp_client(create_app(llm.client, _settings(llm, image_url_hosts=("127.0.0.1", "localhost"))))
    # Allow-listed host names that resolve to loopback are still refused (server-side request forgery guard).
    server_url = str(client.make_url("/health"))
    resp = await client.post("/", json={"prompt": "Hi", "images": [server_url], **GREEDY})
    data = await resp.json()
    assert resp.status == 422 and "non-public" in data["message"], data
    by_name = server_url.replace("127.0.0.1", "localhost")  # a name: refused by the resolver at connect time
    resp = await client.post("/", json={"prompt": "Hi", "images": [by_name], **GREEDY})
    data = await resp.json()
    assert resp.status == 422 and "non-public" in data["message"], data
    resp = await client.post("/", json={"prompt": "Hi", "images": ["http://example.com/cat.png"], **GREEDY})
    await _check(client, resp, 400, "not in IMAGE_URL_HOSTS")


@pytest.mark.parametrize(
    "address,public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_public_address_check(address, public):
    assert _is_public(address) is public


def test_redirect_hops_are_checked_against_the_allow_list():
    intake = ImageIntake(ImageLimits(2, 2**20, 4096, ("images.example.org",), "", 5.0), executor=None, session=None)
    intake._check_host(0, "https://images.example.org/a.png")
    with pytest.raises(Exception, match="not in IMAGE_URL_HOSTS"):
        intake._check_host(0, "https://evil.example.net/a.png")
    with pytest.raises(Exception, match="not an http"):
        intake._check_host(0, "file:///etc/passwd")
