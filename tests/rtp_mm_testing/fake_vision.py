"""A test-only VisionModel that drives the multimodal plumbing (runner, engine fusion, prefix cache, API, server)
independently of the real encoders, on a tiny random HF Llama.

It is llava-shaped: one ``<image>`` token in the prompt becomes ``ROWS`` embedding rows. The encoder is a fixed
random linear map of the image resized to 8x8 (deterministic, so two runs or two processes agree), and it records
every call (batch sizes, the threads that preprocessed and encoded) so tests can see batching and where each stage
ran. The oracle of the fusion
tests is HF transformers run on ``inputs_embeds`` spliced by the test itself (``hf_inputs_embeds``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtp_mm.errors import InvalidRequest
from rtp_mm.llm.engine.multimodal import MultimodalInput, PreparedPrompt
from rtp_mm.llm.models import FAMILIES, llama
from rtp_mm.llm.models.family import Family
from rtp_mm.vision.base import VisionModel
from rtp_mm_testing.oracle import TINY_CHAT_TEMPLATE, tiny_bpe_tokenizer, tiny_llama

MODEL_TYPE = "fake_vision"
IMAGE_TOKEN = "<image>"
ROWS = 6
SIZE = 8
SENTENCES = ["Describe the picture.", "What is in this image? A cat or a dog.", "Hello world, compare them."]


class FakeVisual(torch.nn.Module):
    """The fake's exportable stack: pixels [N, 3, SIZE, SIZE] -> [N, ROWS, hidden] through one fixed linear map."""

    def __init__(self, proj: torch.Tensor, hidden: int):
        super().__init__()
        self.register_buffer("proj", proj)
        self.hidden = hidden

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.flatten(1) @ self.proj).reshape(pixels.shape[0], ROWS, self.hidden)


class FakeVisionModel(VisionModel):
    family = "llama"

    def __init__(self, image_token_id: int, hidden: int, dtype: torch.dtype = torch.float32, seed: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.image_token_id = image_token_id
        self.dtype = dtype
        # Scaled like the tiny Llama's token embeddings (std 0.02) so image rows matter but do not dominate.
        self.visual = FakeVisual(torch.randn(3 * SIZE * SIZE, ROWS * hidden, generator=g) * 0.02, hidden)
        self.batch_sizes: list[int] = []
        self.preprocess_threads: list[str] = []
        self.encode_threads: list[str] = []
        self.fail_encode = False
        self.lock = threading.Lock()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        with self.lock:
            self.preprocess_threads.append(threading.current_thread().name)
        small = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(small, dtype=np.float32)).permute(2, 0, 1)  # [3, S, S]
        return pixels / 127.5 - 1.0

    def visual_module(self) -> torch.nn.Module:
        return self.visual

    def pixel_shape(self) -> tuple[int, int, int]:
        return (3, SIZE, SIZE)

    def stack(self, pixel_values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(pixel_values)

    def unstack(self, pixel_values: list[torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
        return [r.to(self.dtype) for r in features]

    def encode(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock:
            self.batch_sizes.append(len(pixel_values))
            self.encode_threads.append(threading.current_thread().name)
        if self.fail_encode:
            raise RuntimeError("fake encoder failure")
        return super().encode(pixel_values)

    def expand(self, prompt_ids: list[int], embeds: list[torch.Tensor], hashes: list[str]) -> PreparedPrompt:
        spans = [i for i, t in enumerate(prompt_ids) if t == self.image_token_id]
        if len(spans) != len(embeds):
            raise InvalidRequest(
                f"number of multimodal tags ({len(spans)}) and multimodal input ({len(embeds)}) not matched"
            )
        ids: list[int] = []
        mm: list[MultimodalInput] = []
        last = 0
        for pos, rows, h in zip(spans, embeds, hashes, strict=True):
            ids += prompt_ids[last:pos]
            mm.append(MultimodalInput(embeds=rows, offset=len(ids), content_hash=h))
            ids += [self.image_token_id] * rows.shape[0]
            last = pos + 1
        ids += prompt_ids[last:]
        return PreparedPrompt(ids, mm)

    def image_placeholder(self, index: int) -> str:
        return IMAGE_TOKEN


def load_fake(ckpt_path: str, config: dict, extra_data_path: str, device: str, dtype: torch.dtype) -> VisionModel:
    return FakeVisionModel(config["image_token_index"], config["hidden_size"], dtype)


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """MODEL_TYPE=fake_vision (a Llama LM with the fake encoder) declared in the registry for the duration of the
    block, as a real family declares itself."""
    family = Family(
        MODEL_TYPE, (MODEL_TYPE,), llama.build, layout="llama", vision="rtp_mm_testing.fake_vision:load_fake"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILIES, MODEL_TYPE, family)
        yield


def make_checkpoint(path: Path, seed: int = 11, **llama: int) -> tuple[torch.nn.Module, int]:
    """A tiny random Llama + a BPE tokenizer with ``<image>`` as a special token. Returns (HF model, image id)."""
    import json

    model = tiny_llama(path, seed=seed, **llama)
    tok = tiny_bpe_tokenizer(path, SENTENCES, chat_template=TINY_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.save_pretrained(str(path))
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = json.loads((path / "config.json").read_text())
    config["image_token_index"] = image_id
    (path / "config.json").write_text(json.dumps(config))
    return model, image_id


def picture(seed: int, width: int = 24, height: int = 16) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(data.numpy(), "RGB")


def hf_inputs_embeds(model: torch.nn.Module, prepared: PreparedPrompt) -> torch.Tensor:
    """The oracle's input embeddings: HF's own token embeddings with the image rows written over their spans."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor([prepared.token_ids]))[0].clone()
        for mm in prepared.mm_inputs:
            embeds[mm.offset : mm.offset + mm.embeds.shape[0]] = mm.embeds
    return embeds[None]


@torch.no_grad()
def hf_greedy_embeds(model: torch.nn.Module, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    out = model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, -max_new_tokens:].tolist()


@contextlib.contextmanager
def engine_paused(client) -> Iterator[None]:
    """Hold the engine thread (a blocking ``call``) for the block: requests submitted meanwhile queue up and are
    admitted together when it ends, so one engine step sees all of them (deterministic batching in tests)."""
    gate, entered = threading.Event(), threading.Event()

    def hold(_engine) -> None:
        entered.set()
        gate.wait(30)

    holder = threading.Thread(target=client.call, args=(hold, 60.0))
    holder.start()
    assert entered.wait(30), "the engine thread did not pick up the pause"
    try:
        yield
    finally:
        gate.set()
        holder.join()
