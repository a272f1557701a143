"""``rtp-mm bench --speculative``: the CLI hands the flag to its module, and the table's ratios are lookup over plain
medians (the full run loads the default model twice; its numbers are in BENCHMARKS.md)."""

from __future__ import annotations

from rtp_mm.benchmarks import cli, speculative


def test_cli_hands_speculative_runs_to_its_module(monkeypatch):
    seen = []
    monkeypatch.setattr(speculative, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["--speculative", "--repeats", "2"]) == 0
    assert seen == [["--repeats", "2"]]


def test_render_reports_medians_speed_up_and_acceptance():
    row = {"name": "rewrite", "prompt_tokens": 100, "tokens": 60, "plain": [10.0, 12.0, 11.0]}
    row |= {"lookup": [30.0, 20.0, 22.0], "proposed": 50, "accepted": 40, "steps": 20, "identical": True}
    stats = {"spec_accepted_tokens": 40, "spec_proposed_tokens": 50, "spec_acceptance_rate": 0.8}
    table = speculative.render(
        {"rows": [row], "together": {"plain": 20.0, "lookup": 30.0}, "stats": stats, "k": 5, "weight_type": "FP32"}
    )
    assert "| rewrite (100-token prompt) | 60 | 11.0 | 22.0 | **2.00x** | 40 / 50 (80%) | 3.00 | yes |" in table
    assert "**all prompts, median speed-up** | | | | **2.00x**" in table
    assert "| 20.0 | 30.0 | 1.50x |" in table
    assert "GEN_NUM_PER_CIRCLE=5" in table
