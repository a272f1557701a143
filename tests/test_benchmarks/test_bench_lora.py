"""``rtp-mm bench --lora``: its adapters are what peft reads, and a tiny run writes its BENCHMARKS.md section."""

from __future__ import annotations

import torch

from rtp_mm.benchmarks.cli import main as bench_main
from rtp_mm.benchmarks.lora import SECTION_HEADING, write_adapter, write_model


def test_written_adapter_is_what_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    config = write_model(tmp_path / "base", hidden=128, layers=2)
    path = write_adapter(tmp_path / "lora", config, rank=4, seed=0)
    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    ids = torch.tensor([[5, 9, 200, 31]])
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, path).eval()(ids).logits
    assert adapted.shape == plain.shape and not torch.allclose(adapted, plain)


def test_tiny_run_writes_its_section(tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    args = ["--lora", "--hidden", "128", "--layers", "2", "--new-tokens", "4", "--repeats", "1", "--output", str(out)]
    assert bench_main(args) == 0
    text = out.read_text()
    assert text.startswith(SECTION_HEADING) and "4 adapters, kept apart, mixed 4 x 4" in text
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "tok/s" not in line]
    assert len(rows) == 5 and all(float(row.split("|")[2]) > 0 for row in rows)
