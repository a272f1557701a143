"""Rejection sampling keeps the target model's distribution: the first token of 2,000 seeded sampled requests, each
verified against a proposal (prompt lookup's or a draft model's), follows the target's own distribution
(chi-square, p > 0.01), while a slightly different distribution is rejected by the same test on the same counts.

Oracles: the HF model the checkpoint was saved from (its softmax at temperature 1 is the exact distribution of the
first sampled token), and for the verification rule alone, explicit distributions p and q.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from rtp_mm import LLM, GenerateConfig, ModelConfig, SpeculativeConfig
from rtp_mm.llm.engine.proposal import Proposal
from rtp_mm.llm.engine.rejection import accepted_tokens
from rtp_mm.llm.engine.scheduler import SamplingParams
from rtp_mm_testing.oracle import perturb, save_hf, tiny_llama

N = 2000
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0)  # the plain softmax: its oracle is the HF model's logits


def chi_square_p_value(counts: Counter, probs: torch.Tensor, n: int) -> float:
    """Pearson's test of ``counts`` (n draws) against ``probs``: one bin per token expected at least 5 times, the
    rest pooled (into the smallest bin when the pool itself is expected fewer than 5 times). The p-value is the
    chi-square survival function, the regularized upper incomplete gamma Q(df / 2, stat / 2)."""
    expected = probs.double() * n
    tokens = torch.nonzero(expected >= 5).flatten().tolist()
    observed = [float(counts[t]) for t in tokens]
    wanted = [float(expected[t]) for t in tokens]
    rest_observed, rest_wanted = n - sum(observed), n - sum(wanted)
    if rest_wanted >= 5:
        observed.append(rest_observed)
        wanted.append(rest_wanted)
    else:
        smallest = min(range(len(wanted)), key=wanted.__getitem__)
        observed[smallest] += rest_observed
        wanted[smallest] += rest_wanted
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True))
    df = len(wanted) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    """A target whose next-token distributions are peaked over a handful of tokens (a scaled head), a draft that
    is a noisy copy of it, and a prompt whose last bigram occurred before, followed by a token the target gives
    probability near 1/2: prompt lookup proposes it, and it is kept about half of the time."""
    root = tmp_path_factory.mktemp("speculative_sampling")
    target = tiny_llama(seed=11)
    with torch.no_grad():
        target.lm_head.weight.mul_(40)
    save_hf(target, root / "target")
    draft = perturb(tiny_llama(seed=11), std=0.005, seed=5)
    with torch.no_grad():
        draft.lm_head.weight.mul_(40)
    save_hf(draft, root / "draft")
    g = torch.Generator().manual_seed(0)
    r1, ab, mid, r2 = (torch.randint(3, 320, (n,), generator=g).tolist() for n in (6, 2, 2, 5))
    candidates = list(range(3, 320))
    with torch.no_grad():
        logits = target(torch.tensor([r1 + ab + [d] + mid + r2 + ab for d in candidates])).logits[:, -1]
    p_d = logits.softmax(-1)[torch.arange(len(candidates)), torch.tensor(candidates)]
    d = candidates[int((p_d - 0.5).abs().argmin())]
    prompt = r1 + ab + [d] + mid + r2 + ab
    with torch.no_grad():
        p = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        q = draft(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    return {"root": root, "prompt": prompt, "proposed": d, "p": p, "q": q}


def first_tokens(llm: LLM, prompt: list[int]) -> Counter:
    # max_new_tokens=3: the prefill step itself verifies a proposal of two tokens (room for one more).
    requests = [
        llm.client.request(prompt, GenerateConfig(max_new_tokens=3, random_seed=s, **SAMPLED)) for s in range(N)
    ]
    return Counter(out.token_ids[0] for out in llm.client.run(requests))


@pytest.mark.parametrize("kind", ["prompt_lookup", "vanilla"])
def test_sampled_first_tokens_follow_the_target_distribution(models, kind):
    root: Path = models["root"]
    sp = SpeculativeConfig("prompt_lookup") if kind == "prompt_lookup" else None
    sp = sp or SpeculativeConfig(sp_checkpoint_path=str(root / "draft"))
    config = ModelConfig(model_type="llama", ckpt_path=root / "target", weight_type="FP32", gen_num_per_circle=2)
    # 16 prompts of 17 tokens and their proposals fit one step's token budget: every first token is verified.
    llm = LLM(config, kv_cache_mem_mb=16, skip_tokenizer_init=True, speculative=sp, concurrency_limit=16)
    try:
        counts = first_tokens(llm, models["prompt"])
        stats = llm.client.stats()
    finally:
        llm.shutdown()
    p = models["p"]
    assert stats["spec_verified_seqs"] >= N  # every request's first token went through verification
    assert 0.1 < stats["spec_acceptance_rate"] < 0.9, stats  # proposals both kept and rejected
    assert chi_square_p_value(counts, p, N) > 0.01
    # The test has power: the same counts reject a nearby distribution (temperature 1.25).
    hotter = torch.log(p).div(1.25).softmax(-1)
    assert chi_square_p_value(counts, hotter, N) < 0.01
    if kind == "prompt_lookup":  # and the proposal alone, kept every time, is not what was drawn
        assert counts[models["proposed"]] < 0.8 * N
    else:  # nor the draft's own distribution
        assert chi_square_p_value(counts, models["q"], N) < 0.01


@pytest.mark.parametrize("with_draft", [False, True], ids=["point_mass", "draft_q"])
def test_verification_rule_on_explicit_distributions(with_draft):
    """accepted_tokens alone: the first emitted token ~ p, whatever q proposed it (20,000 seeded draws)."""
    p = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1, 0.0])
    q = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.1, 0.2])
    rows = torch.log(p.clamp_min(1e-30))[None].repeat(2, 1)  # two target rows: the proposal's and the bonus
    config = GenerateConfig(**SAMPLED)
    counts: Counter = Counter()
    n = 20_000
    for seed in range(n):
        generator = torch.Generator().manual_seed(seed)
        params = SamplingParams(config, frozenset(), 0, 3, (), generator)
        if with_draft:
            proposed = int(torch.multinomial(q, 1, generator=generator))
            proposal = Proposal((proposed,), q[None])
        else:
            proposal = Proposal((2,))
        counts[accepted_tokens(rows, params, proposal)[0]] += 1
    assert chi_square_p_value(counts, p, n) > 0.01
    # Power: resampling from p itself after a rejection (not from the residual) would give this instead.
    d_mass = p.minimum(q) if with_draft else p[2] * torch.eye(6)[2]  # proposed and kept, per token
    naive = d_mass + (1 - d_mass.sum()) * p
    assert chi_square_p_value(counts, naive, n) < 0.01
