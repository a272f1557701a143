"""The playground page in a real browser: Debian's Chromium driven by selenium against a real server.

A tiny multimodal model (the fake vision family over a tiny Llama, tests/rtp_mm_testing/fake_vision.py) serves the
page: an image attached by the file picker and a question give a streamed answer equal to the offline API's greedy
answer for the same conversation; an image dropped on the composer becomes a thumbnail; the stop button cancels the
request on the server, whose KV blocks are free again; an image over IMAGE_MAX_MB shows the server's error. A
text-only model disables image attach and says why; with API_KEY the page asks for the key and keeps it nowhere but in
memory. The page keeps a strict Content-Security-Policy and never talks to another origin.

``PLAYGROUND_SCREENSHOT=docs/playground.png`` makes the first test save the screenshot the README shows.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.server.playground import CONTENT_SECURITY_POLICY
from rtp_mm_testing.fake_vision import MODEL_TYPE, make_checkpoint, picture, registered
from rtp_mm_testing.serving import background_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUESTION = "Describe the picture."
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            f"the playground tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
            "`make test` installs them (apt-get)",
            pytrace=False,
        )
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",  # nothing but the page's own requests leave the browser
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,860",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _llm(path, model_type: str) -> LLM:
    with registered():
        return LLM(ModelConfig(model_type=model_type, ckpt_path=str(path), weight_type="FP32"), kv_cache_mem_mb=16)


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """(LLM, base URL) of the fake vision model, with IMAGE_MAX_MB=1."""
    path = tmp_path_factory.mktemp("playground_vlm")
    make_checkpoint(path, seed=21)
    llm = _llm(path, MODEL_TYPE)
    with background_server(llm, image_max_mb=1) as url:
        yield llm, url
    llm.shutdown()


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """(LLM, base URL) of a text-only tiny Llama behind API_KEY=secret."""
    path = tmp_path_factory.mktemp("playground_llm")
    make_checkpoint(path, seed=22)
    llm = _llm(path, "llama")
    with background_server(llm, api_key="secret") as url:
        yield llm, url
    llm.shutdown()


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def open_page(driver, url: str) -> None:
    driver.get(url + "/playground")
    wait_for(lambda: "loading" not in by_id(driver, "model").text, what="the model line")


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def settings(driver, **values: object) -> None:
    for element_id, value in values.items():
        field = by_id(driver, element_id.replace("_", "-"))
        field.clear()
        field.send_keys(str(value))


def ask(driver, text: str) -> None:
    by_id(driver, "prompt").send_keys(text)
    by_id(driver, "send").click()


def last_answer(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def png(path, image: Image.Image) -> str:
    image.save(path, format="PNG")
    return str(path)


def test_an_image_question_streams_the_offline_greedy_answer(browser, vision, tmp_path):
    llm, url = vision
    open_page(browser, url)
    settings(browser, max_tokens=NEW_TOKENS, temperature=0, top_k=0, extra='{"ignore_eos": true}')
    image = picture(5, width=40, height=28)
    by_id(browser, "file").send_keys(png(tmp_path / "cat.png", image))
    wait_for(lambda: browser.find_elements("css selector", "#thumbs img"), what="the thumbnail")
    ask(browser, QUESTION)
    answer = last_answer(browser)
    wait_for(lambda: answer.get_attribute("data-state") == "done", what="the streamed answer")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    (offline,) = llm.chat(messages, GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True))
    assert offline.text and answer.text == offline.text
    assert browser.find_elements("css selector", ".message.user .images img")  # the question shows its image
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        browser.save_screenshot(os.environ["PLAYGROUND_SCREENSHOT"])


def test_a_dropped_image_becomes_a_thumbnail(browser, vision):
    _, url = vision
    open_page(browser, url)
    buf = io.BytesIO()
    picture(6).save(buf, format="PNG")
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        const composer = document.getElementById("composer");
        composer.dispatchEvent(new DragEvent("dragover", { dataTransfer: data, bubbles: true, cancelable: true }));
        composer.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        """,
        __import__("base64").b64encode(buf.getvalue()).decode(),
    )
    thumbs = wait_for(lambda: browser.find_elements("css selector", "#thumbs img"), what="the dropped thumbnail")
    assert thumbs[0].get_attribute("alt") == "dropped.png"


def test_stop_cancels_the_request_on_the_server(browser, vision):
    llm, url = vision
    open_page(browser, url)
    settings(browser, max_tokens=2000, temperature=0, extra='{"ignore_eos": true}')
    ask(browser, "Hello world")
    answer = last_answer(browser)
    wait_for(lambda: answer.text, what="the first streamed tokens")
    assert llm.stats()["num_running"] == 1
    by_id(browser, "stop").click()
    wait_for(lambda: answer.get_attribute("data-state") == "stopped", what="the stopped state")
    stats = wait_for(
        lambda: (s := llm.stats())["num_running"] == 0 and s["free_blocks"] == s["num_blocks"] and s,
        timeout=10,
        what="the request freed on the server",
    )
    assert stats["num_waiting"] == 0
    status = json.loads(urllib.request.urlopen(url + "/worker_status", timeout=10).read())
    assert status["available_concurrency"] == llm.engine_config.concurrency_limit


def test_an_image_over_the_limit_shows_the_servers_error(browser, vision, tmp_path):
    _, url = vision
    open_page(browser, url)
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)  # ~1.5 MB as PNG
    big = png(tmp_path / "big.png", Image.fromarray(noise))
    assert os.path.getsize(big) > 2**20
    by_id(browser, "file").send_keys(big)
    ask(browser, QUESTION)
    error = wait_for(lambda: by_id(browser, "error").text, what="the error banner")
    assert "413" in error and "IMAGE_MAX_MB" in error
    assert last_answer(browser).get_attribute("data-state") == "error"


def test_a_text_only_model_disables_images_and_the_key_stays_in_memory(browser, text_only):
    llm, url = text_only
    browser.get(url + "/playground")
    key_form = by_id(browser, "key-form")
    wait_for(key_form.is_displayed, what="the API key prompt")  # /v1/models answered 401
    by_id(browser, "api-key").send_keys("secret")
    by_id(browser, "key-form").submit()
    wait_for(lambda: "llama" in by_id(browser, "model").text, what="the model line")
    assert not by_id(browser, "attach").is_enabled() and not by_id(browser, "file").is_enabled()
    assert "text-only" in by_id(browser, "image-note").text
    settings(browser, max_tokens=NEW_TOKENS, temperature=0, extra='{"ignore_eos": true}')
    ask(browser, QUESTION)
    answer = last_answer(browser)
    wait_for(lambda: answer.get_attribute("data-state") == "done", what="the answer")
    messages = [{"role": "user", "content": QUESTION}]
    (offline,) = llm.chat(messages, GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True))
    assert answer.text == offline.text
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]


def test_the_page_keeps_a_strict_csp_and_talks_only_to_its_own_origin(browser, vision):
    _, url = vision
    with urllib.request.urlopen(url + "/playground", timeout=10) as resp:
        html = resp.read().decode()
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "'unsafe-eval'" not in CONTENT_SECURITY_POLICY
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # every script is a file: no inline code
    assert not re.search(r"\son[a-z]+\s*=", html) and not re.search(r"\sstyle\s*=", html)  # no inline handlers/styles
    browser.get_log("browser")  # drop what earlier tests logged
    open_page(browser, url)
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert resources and all(name.startswith(url) for name in resources), resources
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems  # a CSP violation would be logged here


def test_the_start_up_log_prints_the_playground_address(tmp_path):
    """``python -m rtp_mm.start_server`` names the playground's URL in its one start-up line and serves it."""
    path = tmp_path / "ckpt"
    make_checkpoint(path, seed=23)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CHECKPOINT_PATH": str(path), "MODEL_TYPE": "llama", "START_PORT": str(port)}
    env |= {"HOST": "127.0.0.1", "KV_CACHE_MEM_MB": "16", "WEIGHT_TYPE": "FP32"}
    proc = subprocess.Popen([sys.executable, "-m", "rtp_mm.start_server"], env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "playground" not in line:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert f"(playground: http://127.0.0.1:{port}/playground)" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/playground", timeout=30) as resp:
            assert b"rtp-mm playground" in resp.read()
    finally:
        proc.terminate()
        proc.wait(30)
