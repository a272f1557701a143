"""Tensor parallelism through the server, in real processes: ``TP_SIZE=2 python -m rtp_mm.start_server`` (rank 0 spawns
rank 1) answers with TP=1's greedy tokens and logprobs for every sharding case, TP_SPLIT_EMB_AND_LMHEAD on and off,
and stops its rank at SIGTERM; ``torchrun --nproc-per-node 2 -m rtp_mm.start_server`` does too; FT_DISABLE_CUSTOM_AR=2
starts (any value but 1 leaves the custom all-reduce on, as the seed says); killing a rank stops the server with a
clear message within 30 s."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm_testing.llava import SIZES, image, processor, save_llava, tiny_llava
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, random_prompts, save_hf, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import start_server_process
from rtp_mm_testing.tp_cases import CASES

PROMPTS = random_prompts(300, [5, 11, 17], seed=9)


SENTENCES = ["Hello world, the quick brown fox.", "Tensor parallel ranks share the work."]


def _with_tokenizer(path: Path) -> Path:
    tiny_bpe_tokenizer(path, SENTENCES)  # 300 tokens: within every case's vocabulary
    return path


def _reference(path: Path, model_type: str) -> list:
    """TP=1 through the offline API, with the tokenizer: texts as the server detokenizes them."""
    config = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True, logprobs=1)
    model = ModelConfig(model_type=model_type, ckpt_path=str(path), weight_type="FP32", max_seq_len=256)
    with LLM(model, kv_cache_mem_mb=16) as llm:
        return llm.generate(PROMPTS, config)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _with_tokenizer(save_hf(tiny_llama(), tmp_path_factory.mktemp("tp") / "llama"))


@pytest.fixture(scope="module")
def reference(ckpt) -> list:
    return _reference(ckpt, "llama")


def _check_against(url: str, reference: list) -> None:
    """Greedy completions of the token-id prompts: TP=1's tokens (as text) and chosen-token logprobs within 1e-4."""
    for prompt, ref in zip(PROMPTS, reference, strict=True):
        body = {
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 1,
            "extra_configs": {"ignore_eos": True},
        }
        req = urllib.request.Request(
            url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            choice = json.loads(resp.read())["choices"][0]
        assert choice["text"] == ref.text
        got = choice["logprobs"]["token_logprobs"]
        want = [entry[token] for entry, token in zip(ref.logprobs, ref.token_ids, strict=True)]
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


def _server_env(**env: str) -> dict[str, str]:
    return {"WEIGHT_TYPE": "FP32", "KV_CACHE_MEM_MB": "16", "LOG_LEVEL": "WARNING", **env}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _workers(pid: int) -> list[int]:
    return [p for p in _children(pid) if b"tp_worker" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_server_matches_tp1(tmp_path, case):
    build, model_type, _ = CASES[case]
    path = _with_tokenizer(build(tmp_path / case))
    reference = _reference(path, model_type)
    for split in ("1", "0"):
        env = _server_env(MODEL_TYPE=model_type, TP_SIZE="2", TP_SPLIT_EMB_AND_LMHEAD=split, MAX_SEQ_LEN="256")
        proc, url = start_server_process(path, **env)
        try:
            assert len(_workers(proc.pid)) == 1
            _check_against(url, reference)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0  # rank 0 told its rank to stop and reaped it
        finally:
            if proc.poll() is None:
                proc.kill()


def test_killed_rank_stops_the_server_within_30_s(ckpt, reference):
    proc, url = start_server_process(ckpt, TP_SIZE="2", FT_DISABLE_CUSTOM_AR="2", **_server_env())
    try:
        _check_against(url, reference)
        workers = _workers(proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - start
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"the server exited with status {code} {elapsed:.1f} s after its rank was killed")
    assert code == 1 and elapsed < 30
    assert "custom all-reduce on" in err  # FT_DISABLE_CUSTOM_AR=2 leaves it on (gloo on CPU either way)
    assert "tensor-parallel rank 0 of 2: a collective failed, so another rank died or hung" in err, err[-2000:]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the graceful shutdown that also stops the ranks), then a kill if it takes longer than 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_launch_serves_tp1_tokens(ckpt, reference):
    port, master = _free_port(), _free_port()
    env = {
        **os.environ,
        "CHECKPOINT_PATH": str(ckpt),
        "MODEL_TYPE": "llama",
        "START_PORT": str(port),
        "HOST": "127.0.0.1",
        **_server_env(),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command = [*torchrun, "--master-port", str(master), "-m", "rtp_mm.start_server"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "torchrun's server did not come up"
                time.sleep(0.3)
        _check_against(url, reference)
    finally:
        _stop(proc)


def _tiny_llava_server_checkpoint(path: Path) -> Path:
    """A tiny LLaVA-1.5 (HF layout, CLIP tower) with a chat template and a tokenizer whose ``<image>`` is the
    checkpoint's image_token_index, so images can be sent over HTTP."""
    from transformers import PreTrainedTokenizerFast

    model = tiny_llava("1.5")
    save_llava(model, processor("1.5"), path, "save_pretrained")
    tiny_bpe_tokenizer(path, SENTENCES, chat_template=TINY_CHAT_TEMPLATE)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config["image_token_index"] = config["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_tp2_server_multimodal_matches_tp1(tmp_path):
    """LLaVA over HTTP (OpenAI chat with a data: URL image): rank 0 decodes, preprocesses and encodes the image, and
    its rows reach rank 1 in the broadcast batch; TP_SPLIT_EMB_AND_LMHEAD on and off give TP=1's text and logprobs."""
    import base64
    import io

    path = _tiny_llava_server_checkpoint(tmp_path / "llava")
    picture = image(SIZES[1], 3)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
    messages = [{"role": "user", "content": parts}]
    config = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True, logprobs=1)
    with LLM(ModelConfig(model_type="llava", ckpt_path=str(path), weight_type="FP32"), kv_cache_mem_mb=16) as llm:
        (ref,) = llm.chat(messages, config)
    want = [entry[token] for entry, token in zip(ref.logprobs, ref.token_ids, strict=True)]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    body["extra_configs"] = {"ignore_eos": True}
    for split in ("1", "0"):
        env = _server_env(MODEL_TYPE="llava", TP_SIZE="2", TP_SPLIT_EMB_AND_LMHEAD=split)
        proc, base = start_server_process(path, **env)
        try:
            req = urllib.request.Request(
                base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                choice = json.loads(resp.read())["choices"][0]
            assert choice["message"]["content"] == ref.text
            got = [entry["logprob"] for entry in choice["logprobs"]["content"]]
            assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
        finally:
            _stop(proc)
