"""The text benchmark's inputs (one ``Workload`` of token ids, built once so that every system sees identical
inputs) and the timing records and metrics shared by the rtp-mm and HF workers."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, NamedTuple

PHASES = ("a", "b", "c")
DECODE_MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
# Prefill cost does not depend on the words, but real text keeps the prompt realistic for the tokenizer.
TTFT_TEXT = (
    "The lighthouse stood on a spur of black rock at the mouth of the bay, and for forty years its lamp had turned "
    "every night without fail. The keeper climbed the spiral stair at dusk, trimmed the wick, wound the clockwork "
    "that rotated the lens, and wrote the weather in a leather logbook: wind from the south-west, sea moderate, "
    "visibility good. Ships passing in the dark saw the double flash every ten seconds and knew where they were. "
)
RANDOM_ID_LOW = 1000  # random prompt ids start above the special and byte tokens


@dataclass(frozen=True)
class Workload:
    """Every input of one run, as token ids. Invariant: ``len(serve_prompts) == len(serve_new_tokens)``."""

    decode_prompt: list[int]
    decode_new_tokens: int
    warmup_new_tokens: int
    serve_prompts: list[list[int]]
    serve_new_tokens: list[int]
    max_in_flight: int
    ttft_prompt: list[int]
    ttft_repeats: int
    seed: int

    @property
    def longest_request(self) -> int:
        """Tokens of workload (b)'s longest request (prompt + max_new_tokens): the KV capacity rows count these."""
        return max(len(p) + n for p, n in zip(self.serve_prompts, self.serve_new_tokens, strict=True))

    def describe(self, phases: str = "abc") -> str:
        lens = [len(p) for p in self.serve_prompts]
        parts = {
            "a": f"(a) chat prompt of {len(self.decode_prompt)} tokens, {self.decode_new_tokens} new tokens, batch 1.",
            "b": f"(b) {len(lens)} requests arriving at once, prompts {min(lens)}-{max(lens)} tokens (random ids, "
            f"seed {self.seed}), max_new_tokens {min(self.serve_new_tokens)}-{max(self.serve_new_tokens)} (sum "
            f"{sum(self.serve_new_tokens)}), at most {self.max_in_flight} in flight; rtp-mm: continuous batching "
            f"(asyncio + Semaphore); HF: static left-padded batches of {self.max_in_flight} in arrival order, each run "
            "to its longest request.",
            "c": f"(c) {len(self.ttft_prompt)}-token prompt, 1 new token, median of {self.ttft_repeats}.",
        }
        chosen = " ".join(text for key, text in parts.items() if key in phases)
        chosen += (
            f" KV capacity: sequences of {self.longest_request} tokens (workload (b)'s longest request) "
            "that fit in the KV cache at once."
        )
        return f"{chosen} All greedy with EOS ignored, after one {self.warmup_new_tokens}-token warm-up per system."


def build_workload(tokenizer: Any, quick: bool, seed: int) -> Workload:
    import torch

    generator = torch.Generator().manual_seed(seed)
    num_requests, new_low, new_high = (16, 16, 32) if quick else (64, 16, 256)
    lens = torch.randint(20, 201, (num_requests,), generator=generator).tolist()
    new_tokens = torch.randint(new_low, new_high + 1, (num_requests,), generator=generator).tolist()
    vocab = len(tokenizer)
    prompts = [torch.randint(RANDOM_ID_LOW, vocab, (n,), generator=generator).tolist() for n in lens]
    chat = tokenizer.apply_chat_template(DECODE_MESSAGES, tokenize=False, add_generation_prompt=True)
    text_ids = list(tokenizer.encode(TTFT_TEXT, add_special_tokens=False))
    return Workload(
        decode_prompt=list(tokenizer.encode(chat, add_special_tokens=False)),
        decode_new_tokens=32 if quick else 128,
        warmup_new_tokens=8,
        serve_prompts=prompts,
        serve_new_tokens=new_tokens,
        max_in_flight=16,
        ttft_prompt=(text_ids * (150 // len(text_ids) + 1))[:150],
        ttft_repeats=3,
        seed=seed,
    )


# ---- timing records shared by both systems ----------------------------------------------------------------------
@dataclass
class StreamTiming:
    """One request run alone: perf_counter stamps of its start, first and last generated token, and return."""

    start: float
    first: float
    last: float
    end: float
    token_ids: list[int] = field(default_factory=list)


class RequestTiming(NamedTuple):
    arrival: float  # the workload start: every request of (b) arrives at once
    submit: float  # when it entered service (rtp-mm: semaphore acquired; HF: its batch started)
    first: float
    end: float


def single_metrics(prefix: str, t: StreamTiming, num_new: int) -> dict[str, float]:
    metrics = {f"{prefix}_ttft_ms": (t.first - t.start) * 1000, f"{prefix}_e2e_tps": num_new / (t.end - t.start)}
    if num_new > 1:
        metrics[f"{prefix}_decode_tps"] = (num_new - 1) / (t.last - t.first)
    return metrics


def serve_metrics(timings: list[RequestTiming], new_tokens: list[int]) -> dict[str, float]:
    start = min(r.arrival for r in timings)
    wall = max(r.end for r in timings) - start
    latency = [r.end - r.arrival for r in timings]
    return {
        "b_wall_s": wall,
        "b_tps": sum(new_tokens) / wall,
        "b_latency_mean_s": statistics.fmean(latency),
        "b_latency_p90_s": percentile(latency, 90),
        "b_ttft_mean_s": statistics.fmean(r.first - r.arrival for r in timings),
        "b_service_latency_mean_s": statistics.fmean(r.end - r.submit for r in timings),
        "b_service_ttft_mean_s": statistics.fmean(r.first - r.submit for r in timings),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
