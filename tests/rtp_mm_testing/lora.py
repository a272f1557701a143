"""LoRA oracles: random PEFT adapters made with the ``peft`` library on a tiny HF model, and the peft-wrapped model
of each as the reference for rtp-mm's greedy tokens and logprobs.

PEFT initialises ``lora_B`` to zero (an adapter that changes nothing); these adapters get random A and B, so each
one really changes the model's answer (``check_adapters_change_answers`` makes sure, so a test that ignored the
adapter would fail).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtp_mm import GenerateConfig
from rtp_mm_testing.oracle import hf_greedy, hf_step_logprobs

NEW_TOKENS = 24


@dataclass(frozen=True)
class AdapterSpec:
    """A PEFT LoraConfig's interesting fields, plus how to save it."""

    r: int
    alpha: float
    targets: tuple[str, ...] | str  # module name suffixes, or one regex over full module names (PEFT's rules)
    rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    safetensors: bool = True


# Three different adapters: PEFT's default targets, every projection (rsLoRA), and a .bin with a per-module alpha.
LLAMA_ADAPTERS = {
    "qv": AdapterSpec(4, 8, ("q_proj", "v_proj")),
    "all": AdapterSpec(8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "mixed": AdapterSpec(
        2, 4, ("k_proj", "o_proj", "up_proj", "down_proj"), alpha_pattern={"down_proj": 8}, safetensors=False
    ),
}


def make_adapter(base: torch.nn.Module, path: Path, spec: AdapterSpec, seed: int, std: float = 0.1) -> Any:
    """Save a random LoRA adapter of ``base`` (left untouched) to ``path``; returns the peft-wrapped copy."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=spec.targets if isinstance(spec.targets, str) else list(spec.targets),
        lora_dropout=0.0,
        use_rslora=spec.rslora,
        alpha_pattern=dict(spec.alpha_pattern),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)
    model.save_pretrained(str(path), safe_serialization=spec.safetensors)
    return model.eval()


def make_adapters(base: torch.nn.Module, root: Path, specs: dict[str, AdapterSpec]) -> tuple[dict, dict]:
    """({name: folder}, {name: peft-wrapped oracle}) for each spec."""
    paths, oracles = {}, {}
    for seed, (name, spec) in enumerate(specs.items(), start=10):
        paths[name] = str(root / name)
        oracles[name] = make_adapter(base, root / name, spec, seed)
    return paths, oracles


def greedy(max_new_tokens: int = NEW_TOKENS, adapter: str | None = None) -> GenerateConfig:
    return GenerateConfig(max_new_tokens=max_new_tokens, top_k=1, logprobs=5, ignore_eos=True, adapter_name=adapter)


def check_against(out: Any, oracle: torch.nn.Module, prompt: list[int], atol: float = 1e-3) -> float:
    """rtp-mm's output == the oracle's greedy tokens, its top-5 logprobs within ``atol``; returns the worst gap."""
    expected = hf_greedy(oracle, prompt, len(out.token_ids))
    assert out.token_ids == expected, f"prompt {prompt[:6]}...: {out.token_ids} != {expected}"
    ref = hf_step_logprobs(oracle, prompt, expected)
    worst = 0.0
    for step, entry in enumerate(out.logprobs):
        for token, lp in entry.items():
            gap = abs(lp - float(ref[step, token]))
            worst = max(worst, gap)
            assert gap < atol, (step, token, lp, float(ref[step, token]))
    return worst


def run_mixed(llm: Any, prompts: list[list[int]], adapters: list[str | None]) -> list[list[Any]]:
    """Every (prompt, adapter) pair submitted in one command, so they share steps; outputs[prompt][adapter]."""
    requests = [llm.make_request(p, greedy(adapter=a)) for p in prompts for a in adapters]
    outs = llm.client.run(requests)
    return [outs[i * len(adapters) : (i + 1) * len(adapters)] for i in range(len(prompts))]
