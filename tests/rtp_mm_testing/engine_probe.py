"""Looking inside a running engine the way the engine itself would, for tests that compare every prompt position
(full-prompt logits, rotary positions) with an oracle: work runs on the engine thread (``EngineClient.call``), the
request goes through the engine's own admission (``LLMEngine.prepare``: tokenization, image encoding and
expansion, prompt layout) and the runner's own step (``scheduled_seq`` -> ``ModelRunner.hidden_states``)."""

from __future__ import annotations

from typing import Any

import torch

from rtp_mm import GenerateConfig
from rtp_mm.llm.engine.request import Request
from rtp_mm.llm.engine.scheduler import ScheduledBatch, scheduled_seq


def prefill(llm: Any, prompt: Any, images: Any = None) -> tuple[torch.Tensor, list[Any], Request]:
    """Logits [T, vocab] of every row of one full prefill of ``prompt``, the rotary positions the runner used, and
    the Request. Takes free KV blocks and frees them: call while the engine is idle and prefix reuse is off."""
    submitted = llm.make_request(prompt, GenerateConfig(max_new_tokens=1, top_k=1), images)

    @torch.inference_mode()
    def run(engine: Any) -> tuple[torch.Tensor, list[Any], Request]:
        req = engine.prepare(submitted)
        n = req.num_prompt_tokens
        engine.block_manager.allocate(req, n)
        try:
            batch = ScheduledBatch(decodes=(), prefills=(scheduled_seq(req, 0, n),), preempted=(), num_tokens=n)
            hidden, inputs = engine.runner.hidden_states(batch)
            return engine.runner.model.compute_logits(hidden), inputs.positions.tolist(), req
        finally:
            engine.block_manager.free(req)

    return llm.client.call(run, timeout=600.0)


def prompt_logits(llm: Any, prompt: Any, images: Any = None) -> torch.Tensor:
    return prefill(llm, prompt, images)[0]


def prompt_positions(llm: Any, prompt: Any, images: Any = None) -> list[Any]:
    return prefill(llm, prompt, images)[1]
