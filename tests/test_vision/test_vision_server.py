"""Images end to end: ``LLM.chat`` with image parts, native ``POST /`` with ``images``, OpenAI chat with a data URL
through the official ``openai`` client, and multipart uploads from ``rtp_mm.client`` all reach the vision model and
give the same greedy text; bad images fail alone with 4xx; encoder-cache counters appear in ``/metrics``.

Oracles: the offline API on a fresh prompt (``LLM.generate`` with the image, no server), the HF tokenizer's own chat
template on the placeholder-rendered messages, and PNG (lossless) so every route sees the same pixels.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.client import BadRequestError, Client
from rtp_mm_testing.fake_vision import IMAGE_TOKEN, MODEL_TYPE, ROWS, make_checkpoint, picture, registered
from rtp_mm_testing.serving import openai_client

NEW = 10
GREEDY = GenerateConfig(max_new_tokens=NEW, top_k=1, ignore_eos=True)
TEXT = "Describe the picture."


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with registered():
        path = tmp_path_factory.mktemp("fake_vision_server")
        make_checkpoint(path, seed=13)
        llm = LLM(ModelConfig(model_type=MODEL_TYPE, ckpt_path=str(path), weight_type="FP32"), kv_cache_mem_mb=16)
    yield llm
    llm.shutdown()


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _messages(image_part: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": TEXT}, image_part]}]


def test_chat_renders_placeholders_and_passes_images(llm):
    image = picture(1)
    messages = _messages({"type": "image_url", "image_url": {"url": _data_url(image)}})
    ids, sources = llm.chat_prompt(messages)
    # Oracle: the tokenizer's own template on the message with the image part rendered as its placeholder, first.
    rendered = [{"role": "user", "content": IMAGE_TOKEN + TEXT}]
    assert ids == llm.tokenizer.apply_chat_template(rendered, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert len(sources) == 1
    via_url = llm.chat(messages, GREEDY)[0]
    via_pil = llm.chat(_messages({"type": "image", "image": image}), GREEDY)[0]
    expected = llm.generate([ids], GREEDY, images=[[image]])[0]
    assert via_url.token_ids == via_pil.token_ids == expected.token_ids
    assert expected.aux_info["input_len"] == len(ids) - 1 + ROWS
    other = llm.chat(_messages({"type": "image", "image": picture(2)}), GREEDY)[0]
    assert other.token_ids != expected.token_ids  # the image reaches the model


def test_all_routes_give_the_same_greedy_text(llm, url):
    image = picture(3)
    rendered = llm.render_chat([{"role": "user", "content": IMAGE_TOKEN + TEXT}])
    offline = llm.generate(rendered, GREEDY, images=[image])[0].text
    greedy = {"top_k": 1, "max_new_tokens": NEW, "ignore_eos": True}
    status, native = _post(url, {"prompt": rendered, "images": [_data_url(image)], **greedy})
    assert status == 200, native
    with Client(url) as client:
        uploaded = client.generate(rendered, images=[image], **greedy)
        uploaded_chat = client.chat(
            _messages({"type": "image", "image": image}),
            max_tokens=NEW,
            temperature=0,
            extra_configs={"ignore_eos": True},
        )
    oai = openai_client(url)
    reply = oai.chat.completions.create(
        model="tiny",
        messages=_messages({"type": "image_url", "image_url": {"url": _data_url(image)}}),
        max_tokens=NEW,
        temperature=0,
        extra_body={"extra_configs": {"ignore_eos": True}},
    )
    assert offline  # a non-empty greedy text, identical everywhere
    assert native["response"] == uploaded.text == offline
    assert reply.choices[0].message.content == uploaded_chat.text == offline
    threads = set(llm.vision.preprocess_threads)  # the server preprocesses in its image pool, not on its event loop
    assert any(name.startswith("rtp-mm-image") for name in threads) and "rtp-mm-server" not in threads
    assert reply.usage.prompt_tokens == len(llm.chat_ids([{"role": "user", "content": IMAGE_TOKEN + TEXT}])) - 1 + ROWS


def test_prompt_batch_images_are_aligned_with_prompts(llm, url):
    a, b = picture(4), picture(5)
    prompts = [IMAGE_TOKEN + TEXT, "Hello world " + IMAGE_TOKEN]
    greedy = {"top_k": 1, "max_new_tokens": NEW, "ignore_eos": True}
    status, body = _post(url, {"prompt_batch": prompts, "images": [[_data_url(a)], [_data_url(b)]], **greedy})
    assert status == 200, body
    expected = [o.text for o in llm.generate(prompts, GREEDY, images=[[a], [b]])]
    assert [r["response"] for r in body["response_batch"]] == expected


def test_bad_images_fail_alone(llm, url):
    good = picture(6)
    greedy = {"top_k": 1, "max_new_tokens": NEW, "ignore_eos": True}
    results: dict[str, tuple[int, dict]] = {}
    bodies = {
        "good": {"prompt": IMAGE_TOKEN + TEXT, "images": [_data_url(good)], **greedy},
        "undecodable": {"prompt": IMAGE_TOKEN + TEXT, "images": ["data:image/png;base64,aGVsbG8="], **greedy},
        "count": {"prompt": IMAGE_TOKEN + TEXT, "images": [_data_url(good)] * 2, **greedy},
    }
    threads = [threading.Thread(target=lambda k=k: results.update({k: _post(url, bodies[k])})) for k in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["good"][0] == 200
    assert results["good"][1]["response"] == llm.generate(IMAGE_TOKEN + TEXT, GREEDY, images=[good])[0].text
    assert results["undecodable"][0] == 422 and "not a decodable image" in results["undecodable"][1]["message"]
    assert results["count"][0] == 400 and "not matched" in results["count"][1]["message"]
    with Client(url) as client, pytest.raises(BadRequestError, match="not a decodable image"):
        client.generate(IMAGE_TOKEN + TEXT, images=[b"not an image at all"], max_new_tokens=2)
    oai = openai_client(url)
    with pytest.raises(openai.BadRequestError, match="not matched"):
        oai.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": IMAGE_TOKEN + " " + TEXT}],  # a placeholder with no image
            max_tokens=2,
        )


def test_encoder_cache_counters_in_metrics_and_stats(llm, url):
    image = picture(7)
    before = llm.stats()
    for _ in range(2):
        assert _post(url, {"prompt": IMAGE_TOKEN + TEXT, "images": [_data_url(image)], "max_new_tokens": 1})[0] == 200
    after = llm.stats()
    assert after["vision_cache_hits"] - before["vision_cache_hits"] == 1
    assert after["vision_cache_misses"] - before["vision_cache_misses"] == 1
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:
        text = resp.read().decode()
    hits = [line for line in text.splitlines() if line.startswith("rtp_mm_vision_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) == after["vision_cache_hits"]
    assert "rtp_mm_vision_images_encoded_total" in text and "rtp_mm_vision_cache_bytes" in text
