"""Prometheus metrics of one app (``GET /metrics``), in a registry of its own: two apps in one process (tests) never
share counters, and nothing is module-level state.

Request counters and latency histograms are updated as requests run; engine gauges (running/waiting requests, KV
blocks, prefix-cache hits, the vision encoder cache) are read from ``LLM.stats()`` when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# CPU decode steps take milliseconds to tens of ms; long CPU prefills take seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_VISION_COUNTERS = {
    "vision_cache_hits": "Images served from the encoder cache (or shared with a concurrent request)",
    "vision_cache_misses": "Images that had to be encoded",
    "vision_images_encoded": "Images run through the vision encoder",
    "vision_encode_batches": "Vision encoder calls (one batch of images each)",
    "vision_encode_seconds": "Seconds spent in the vision encoder",
}

_SPECULATIVE_COUNTERS = {
    "spec_proposed_tokens": "Tokens proposed by speculative decoding (draft model or prompt lookup)",
    "spec_accepted_tokens": "Proposed tokens the target model accepted",
}


class _EngineCollector(Collector):
    """Turns the latest ``LLM.stats()`` snapshot (and the HTTP in-flight count) into gauges at scrape time."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}
        self.in_flight = 0

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "rtp_mm_http_requests_in_flight", "Generation requests holding a concurrency slot", value=self.in_flight
        )
        s = self.stats
        if not s:
            return
        yield GaugeMetricFamily(
            "rtp_mm_requests_running", "Engine requests scheduled (holding KV blocks)", value=s["num_running"]
        )
        yield GaugeMetricFamily("rtp_mm_requests_waiting", "Engine requests queued", value=s["num_waiting"])
        yield GaugeMetricFamily("rtp_mm_kv_blocks_total", "KV-cache blocks", value=s["num_blocks"])
        yield GaugeMetricFamily(
            "rtp_mm_kv_blocks_in_use", "KV-cache blocks held by requests", value=s["num_blocks"] - s["free_blocks"]
        )
        yield CounterMetricFamily(
            "rtp_mm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", value=s["prefix_hit_tokens"]
        )
        yield CounterMetricFamily(
            "rtp_mm_preemptions", "Requests preempted for lack of KV blocks", value=s["num_preemptions"]
        )
        yield CounterMetricFamily("rtp_mm_engine_steps", "Engine steps run", value=s["step_count"])
        if "spec_proposed_tokens" in s:  # speculative decoding (SP_TYPE): proposals and how many the model kept
            for key, help_text in _SPECULATIVE_COUNTERS.items():
                yield CounterMetricFamily(f"rtp_mm_{key}", help_text, value=s[key])
            yield GaugeMetricFamily(
                "rtp_mm_spec_acceptance_rate", "Accepted / proposed tokens since start", value=s["spec_acceptance_rate"]
            )
        if "vision_cache_hits" in s:  # a vision model: its encoder cache and ViT batches
            for key, help_text in _VISION_COUNTERS.items():
                yield CounterMetricFamily(f"rtp_mm_{key}", help_text, value=s[key])
            yield GaugeMetricFamily(
                "rtp_mm_vision_cache_bytes", "Image embedding bytes in the encoder cache", value=s["vision_cache_bytes"]
            )


class ServerMetrics:
    """The metrics of one app. Invariant: every name starts with ``rtp_mm_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rtp_mm_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "rtp_mm_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.generated_tokens = Counter(
            "rtp_mm_generation_tokens", "Generated tokens of finished requests", registry=self.registry
        )
        self.ttft = Histogram(
            "rtp_mm_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "rtp_mm_time_per_output_token_seconds",
            "Mean time per generated token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.engine = _EngineCollector()
        self.registry.register(self.engine)

    def observe_response(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_finished(self, prompt_tokens: int, output_tokens: int, ttft_s: float | None, decode_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(output_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if output_tokens > 1:
            self.tpot.observe(decode_s / (output_tokens - 1))

    def render(self, stats: dict[str, Any], in_flight: int) -> bytes:
        self.engine.stats = stats
        self.engine.in_flight = in_flight
        return generate_latest(self.registry)
