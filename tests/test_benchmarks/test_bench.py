"""The benchmark harness: its pure helpers against hand-computed values, and one real quick run (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rtp_mm.benchmarks.report import replace_section
from rtp_mm.benchmarks.text import METRICS, SECTION_HEADING, SystemSpec, main, render_table
from rtp_mm.benchmarks.workload import RequestTiming, build_workload, percentile, serve_metrics
from rtp_mm.errors import RtpMmError


class _StubTokenizer:
    """Just enough of a tokenizer for build_workload: a vocabulary size, a chat template and encode()."""

    def __len__(self) -> int:
        return 5000

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<user>" + messages[0]["content"] + "<assistant>"

    def encode(self, text, add_special_tokens):
        return [ord(c) for c in text]


def test_percentile_matches_numpy():
    values = [3.0, 1.0, 7.5, 2.0, 9.0, 4.0, 4.0]
    for q in (0, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_serve_metrics_counts_from_arrival_and_from_admission():
    timings = [RequestTiming(10.0, 10.0, 11.0, 14.0), RequestTiming(10.0, 14.0, 15.0, 20.0)]
    m = serve_metrics(timings, [30, 70])
    assert m["b_wall_s"] == pytest.approx(10.0)
    assert m["b_tps"] == pytest.approx(100 / 10.0)
    assert m["b_latency_mean_s"] == pytest.approx((4.0 + 10.0) / 2)
    assert m["b_ttft_mean_s"] == pytest.approx((1.0 + 5.0) / 2)
    assert m["b_service_latency_mean_s"] == pytest.approx((4.0 + 6.0) / 2)
    assert m["b_service_ttft_mean_s"] == pytest.approx(1.0)


def test_workload_is_deterministic_and_in_range():
    a = build_workload(_StubTokenizer(), quick=False, seed=3)
    assert a == build_workload(_StubTokenizer(), quick=False, seed=3)
    assert a != build_workload(_StubTokenizer(), quick=False, seed=4)
    assert len(a.serve_prompts) == len(a.serve_new_tokens) == 64
    assert all(20 <= len(p) <= 200 for p in a.serve_prompts)
    assert all(16 <= n <= 256 for n in a.serve_new_tokens)
    assert all(1000 <= t < 5000 for p in a.serve_prompts for t in p)
    assert len(a.ttft_prompt) == 150 and a.decode_new_tokens == 128
    quick = build_workload(_StubTokenizer(), quick=True, seed=3)
    assert len(quick.serve_prompts) == 16 and quick.decode_new_tokens == 32 and max(quick.serve_new_tokens) <= 32


def test_render_table_ratios_are_rtp_over_hf():
    results = [
        {"system": "rtp", "weight_type": "FP32", "metrics": {"a_decode_tps": 30.0, "peak_rss_mb": 500.0}},
        {"system": "hf", "weight_type": "FP32", "metrics": {"a_decode_tps": 20.0, "peak_rss_mb": 1000.0}},
    ]
    lines = render_table(results).splitlines()
    assert "rtp-mm fp32" in lines[0] and "HF fp32" in lines[0] and "fp32 / HF" in lines[0]
    decode = next(line for line in lines if line.startswith("| (a) decode"))
    assert decode.rstrip(" |").endswith("1.50x")
    rss = next(line for line in lines if line.startswith("| peak RSS"))
    assert rss.rstrip(" |").endswith("0.50x")
    assert not any(line.startswith("| (b)") for line in lines)  # metrics nobody measured are left out


def build_workload_longest(quick: bool) -> int:
    from rtp_mm.default_model import default_model_path
    from rtp_mm.tokenizers.loader import load_tokenizer

    return build_workload(load_tokenizer(str(default_model_path())), quick=quick, seed=0).longest_request


def test_system_specs_parse_weight_type_and_int8_kv():
    assert SystemSpec.parse("fp16") == SystemSpec("FP16", False)
    assert SystemSpec.parse(" FP32+int8kv ") == SystemSpec("FP32", True)
    assert str(SystemSpec("INT8", False)) == "INT8" and str(SystemSpec("FP32", True)) == "FP32+INT8KV"
    with pytest.raises(RtpMmError, match="--weight-types"):
        SystemSpec.parse("INT3")


def test_kv_capacity_labels_and_int8_kv_column():
    results = [
        {"system": "rtp", "weight_type": "FP32", "metrics": {"kv_blocks": 100.0, "kv_max_seqs": 12.0}},
        {"system": "rtp", "weight_type": "FP32", "int8_kv": True, "metrics": {"kv_blocks": 188.0, "kv_max_seqs": 23.0}},
    ]
    lines = render_table(results, kv_mb=64, seq_len=456).splitlines()
    assert "rtp-mm fp32 int8-KV" in lines[0]
    assert any(line.startswith("| KV blocks in KV_CACHE_MEM_MB=64 ") and "188" in line for line in lines)
    assert any(line.startswith("| max concurrent 456-token sequences ") and "23" in line for line in lines)


def test_replace_section_appends_then_replaces_in_place():
    section = f"{SECTION_HEADING}\n\nold table"
    assert replace_section("", SECTION_HEADING, section) == section + "\n"
    doc = "# Benchmarks\n\nintro\n"
    once = replace_section(doc, SECTION_HEADING, section)
    assert once == doc + "\n" + section + "\n"
    doc = once + "\n## later section\n\nkeep me\n"
    twice = replace_section(doc, SECTION_HEADING, f"{SECTION_HEADING}\n\nnew table")
    assert twice == "# Benchmarks\n\nintro\n\n" + SECTION_HEADING + "\n\nnew table\n\n## later section\n\nkeep me\n"
    assert twice.count(SECTION_HEADING) == 1


@pytest.mark.slow
def test_quick_run_reports_positive_numbers(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    argv = [
        "--quick",
        "--skip-hf",
        "--skip-llama-cpp",
        "--only",
        "a,c",
        "--weight-types",
        "FP32",
        "--json",
        str(out_json),
        "--output",
        str(out_md),
        "--worker-timeout",
        "600",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    wanted = {
        "a_decode_tps",
        "a_e2e_tps",
        "a_ttft_ms",
        "c_ttft_ms",
        "load_s",
        "rss_loaded_mb",
        "peak_rss_mb",
        "kv_blocks",
        "kv_max_seqs",
        "weight_mb",
        "a_roofline_pct",
    }
    report = json.loads(out_json.read_text())
    bandwidth = report["read_bandwidth_gbs"]
    assert bandwidth > 0.5  # GB/s: any DRAM streams faster
    for metric in METRICS:
        label = metric.label.format(kv_mb=512, seq_len=build_workload_longest(quick=True), bw_gbs=bandwidth)
        assert (label in printed) == (metric.key in wanted), label
    (system,) = report["systems"]
    assert system["label"] == "rtp-mm fp32" and "error" not in system
    assert set(system["metrics"]) == wanted
    assert all(v > 0 for v in system["metrics"].values())
    assert system["metrics"]["a_roofline_pct"] < 100  # nothing decodes faster than it can read its weights
    assert len(system["decode_ids"]) == 32
    assert out_md.read_text().startswith(SECTION_HEADING)
