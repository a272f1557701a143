"""A model stand-in for engine tests: a real LLMEngine (admission, scheduler, block manager, postprocessing) whose
runner returns a deterministic token per sampled sequence instead of running a network."""

from __future__ import annotations

from collections.abc import Callable

from rtp_mm.llm.engine.model_runner import SampledToken, StepOutput
from rtp_mm.llm.engine.scheduler import ScheduledBatch

VOCAB = 32000


def fake_token(request_id: int, num_output_tokens: int) -> int:
    return 1 + (request_id * 31 + num_output_tokens * 17) % 30000


class FakeModel:
    """The runner of a real engine, without a model. By default the next token of a sampled sequence is
    ``fake_token``; ``tokens`` (request id -> list) scripts them instead; ``on_scheduled`` sees every batch and
    ``fail`` makes the next step raise (an internal fault)."""

    def __init__(self, tokens: dict[int, list[int]] | None = None) -> None:
        self.tokens = tokens or {}
        self.on_scheduled: Callable[[ScheduledBatch], None] | None = None
        self.fail: Exception | None = None
        self.batches: list[ScheduledBatch] = []

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        self.batches.append(batch)
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        if self.on_scheduled is not None:
            self.on_scheduled(batch)
        out = []
        for seq in batch.seqs:
            if seq.sample:
                n = seq.sampling.num_output_tokens
                script = self.tokens.get(seq.request_id)
                token = script[n] if script is not None else fake_token(seq.request_id, n)
                out.append(SampledToken(seq.request_id, token, None))
        return StepOutput(out)
