"""Checks against ``shared/golden/<case>``: tiny checkpoints of the legacy families in their original on-disk format,
with the outputs of their original implementations (see that folder's README.md).

Full-prompt logits come from one prefill of the engine's own ModelRunner (``engine_probe``: the same admission and
step a request takes, but every row turned into logits); greedy tokens and per-step log-probabilities come from
``LLM.generate``, i.e. prefill then one token per step through the paged KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rtp_mm import LLM, GenerateConfig
from rtp_mm_testing.engine_probe import prompt_logits
from rtp_mm_testing.shared import GOLDEN, golden, require  # noqa: F401  (GOLDEN re-exported)


def golden_case(case: str) -> tuple[Path, list[dict], dict[str, torch.Tensor]]:
    folder = golden(case)
    require(folder / "expected.safetensors")
    inputs = json.loads((folder / "inputs.json").read_text())
    return folder / "checkpoint", inputs, load_file(str(folder / "expected.safetensors"))


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The golden README's tolerance: max |a - b| <= 1e-4 * max(1, max |expected|)."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    tol = 1e-4 * max(1.0, float(expected.abs().max()))
    err = float((got.float() - expected).abs().max())
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def check_golden(llm: LLM, inputs: list[dict], expected: dict[str, torch.Tensor]) -> None:
    """Every input: full-prompt logits, then 8 greedy tokens (EOS ignored) and their log-probabilities, the last
    with all inputs submitted together so prefills and decodes of different lengths share steps."""
    for item in inputs:
        assert_logits_close(prompt_logits(llm, item["input_ids"]), expected[f"logits_{item['name']}"], item["name"])
    cfg = GenerateConfig(max_new_tokens=8, top_k=1, logprobs=5, ignore_eos=True)
    prompts = [item["input_ids"] for item in inputs]
    for outs in ([llm.generate([p], cfg)[0] for p in prompts], llm.generate(prompts, cfg)):
        assert_greedy_golden(outs, inputs, expected)


def assert_greedy_golden(outs: list, inputs: list[dict], expected: dict[str, torch.Tensor]) -> None:
    """Each output's greedy tokens equal the golden ones and its logprobs are within 1e-4 of the golden step logits."""
    for item, out in zip(inputs, outs, strict=True):
        name = item["name"]
        assert out.token_ids == expected[f"greedy_{name}"].tolist(), name
        ref = torch.log_softmax(expected[f"greedy_logits_{name}"].double(), dim=-1)
        for step, entry in enumerate(out.logprobs):
            for token, lp in entry.items():
                assert abs(lp - float(ref[step, token])) < 1e-4, (name, step, token, lp, float(ref[step, token]))
