"""The batched sampler against a plain per-row reference on mixed batches: greedy rows give the same tokens, sampled
rows draw from the same filtered distribution (to 1e-6), each draw is the inverse CDF of one uniform from the row's
own generator, nothing turns NaN, and a step copies device->host once.

The reference below is the per-row algorithm written out with Python loops and per-row torch ops (HF warper order:
penalties, EOS mask, temperature, top-k, top-p), independent of the batched code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rtp_mm.llm.engine import sampler
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.sampler import (
    NUCLEUS_CANDIDATES,
    constrain,
    masked_logits,
    sample,
    sampling_probs,
    sampling_probs_batch,
)
from rtp_mm.llm.engine.scheduler import SamplingParams

VOCAB = 64
EOS = frozenset({5, 9})


class FakeGrammar:
    """A TokenMatcher stand-in: only ``allowed()`` is read by the sampler."""

    def __init__(self, allowed: list[int]):
        self.mask = torch.zeros(VOCAB, dtype=torch.bool)
        self.mask[allowed] = True

    def allowed(self) -> torch.Tensor:
        return self.mask.clone()


def row(config: GenerateConfig, seed: int, prompt=(1, 2), output=(), grammar=None) -> SamplingParams:
    return SamplingParams(
        config=config,
        eos_token_ids=EOS,
        num_output_tokens=len(output),
        prompt_len=len(prompt),
        token_ids=tuple(prompt) + tuple(output),
        generator=torch.Generator().manual_seed(seed),
        grammar=grammar,
    )


def mixed_batch() -> list[SamplingParams]:
    return [
        row(GenerateConfig(top_k=1), 0),
        row(GenerateConfig(temperature=0.7, top_k=5, top_p=1.0), 1),
        row(GenerateConfig(temperature=0.0, repetition_penalty=1.5), 2, prompt=(3, 4, 4, 60)),
        row(GenerateConfig(temperature=1.3, top_p=0.8), 3),
        row(GenerateConfig(temperature=0.9, top_k=10, top_p=0.5), 4, output=(7, 7, 8)),
        row(
            GenerateConfig(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, top_p=0.95),
            5,
            prompt=(0, 11, -200),
            output=(12, 12, 12, 13),
        ),
        row(GenerateConfig(min_new_tokens=4, temperature=1.1), 6, output=(1,)),
        row(GenerateConfig(top_k=1, min_new_tokens=4), 7),
        row(GenerateConfig(logit_bias={3: 5.0, 7: -100.0}, top_k=0, top_p=1.0), 8),
        row(GenerateConfig(temperature=0.8, top_p=0.9), 9, grammar=FakeGrammar([2, 5, 30, 31, 40])),
        row(GenerateConfig(top_k=1000, top_p=0.999, presence_penalty=-1.0), 10, output=(20,)),
        row(GenerateConfig(top_k=1, logit_bias={50: 100.0}), 11),
        row(GenerateConfig(), 12),
    ]


def batch_logits(n: int, seed: int = 0) -> torch.Tensor:
    logits = 3 * torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed))
    logits[:, 5] += 6  # an EOS token that min_new_tokens has to hold back
    return logits


# ---- the per-row reference ----------------------------------------------------------------------------------------
def reference_masked(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    cfg, row_ = params.config, logits.clone()
    for token, bias in (cfg.logit_bias or {}).items():
        row_[token] += bias
    if params.grammar is not None:
        row_[~params.grammar.allowed()] = -math.inf
    if cfg.repetition_penalty != 1.0:
        for t in {t for t in params.token_ids if 0 <= t < VOCAB}:
            row_[t] = row_[t] / cfg.repetition_penalty if row_[t] > 0 else row_[t] * cfg.repetition_penalty
    for t in set(params.output_ids):
        row_[t] -= cfg.frequency_penalty * params.output_ids.count(t) + cfg.presence_penalty
    if params.num_output_tokens < cfg.min_new_tokens:
        row_[sorted(params.eos_token_ids)] = -math.inf
    return row_


def reference_probs(masked: torch.Tensor, cfg: GenerateConfig) -> list[float]:
    values = (masked / max(cfg.temperature, 1e-5)).tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if 0 < cfg.top_k < len(values):
        kth = values[order[cfg.top_k - 1]]
        values = [v if v >= kth else -math.inf for v in values]
    top = max(values)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    probs = [e / sum(exps) for e in exps]
    if cfg.top_p < 1.0:
        kept, mass = set(), 0.0
        for i in order:  # the smallest prefix of the sorted tokens whose mass reaches top_p
            kept.add(i)
            mass += probs[i]
            if mass >= cfg.top_p:
                break
        probs = [p / mass if i in kept else 0.0 for i, p in enumerate(probs)]
    return probs


def inverse_cdf(probs: list[float], u: float) -> int:
    target, cum = u * sum(probs), 0.0
    for i, p in enumerate(probs):
        cum += p
        if p > 0 and cum > target:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)


# ---- tests --------------------------------------------------------------------------------------------------------
def test_mixed_batch_matches_the_per_row_reference(monkeypatch):
    rows, logits = mixed_batch(), batch_logits(13)
    seen = []
    real = sampler._draw

    def spy(probs, uniforms, fallback):
        seen.append((probs.clone(), uniforms.clone()))
        return real(probs, uniforms, fallback)

    monkeypatch.setattr(sampler, "_draw", spy)
    tokens, _ = sample(logits, rows)
    ((probs, uniforms),) = seen  # one draw for the whole batch
    sampled = [i for i, p in enumerate(rows) if not p.config.is_greedy()]
    assert probs.shape == (len(sampled), VOCAB)
    fresh = mixed_batch()  # the same seeds, generators not yet drawn from
    for i, params in enumerate(fresh):
        masked = reference_masked(logits[i], params)
        if params.config.is_greedy():
            assert tokens[i] == int(masked.argmax()), i
            continue
        expected = reference_probs(masked, params.config)
        j = sampled.index(i)
        assert probs[j].tolist() == pytest.approx(expected, abs=1e-6), i
        # the single-row API rejection sampling uses gives the same distribution
        constrained = constrain(logits[i : i + 1], [params])[0]
        single = sampling_probs(masked_logits(constrained, params), params.config)
        assert single.tolist() == pytest.approx(expected, abs=1e-6)
        u = float(torch.rand(1, generator=params.generator, dtype=torch.float64))
        assert float(uniforms[j]) == u  # the row's own generator, one uniform
        assert tokens[i] == inverse_cdf(expected, u), i


def test_top_p_over_a_vocabulary_wider_than_the_candidates():
    """On CPU top-p first looks for the nucleus among the top NUCLEUS_CANDIDATES tokens; rows whose nucleus is wider
    (flat ones) are sorted whole. Both kinds, side by side, give the reference's distribution."""
    vocab = 4 * NUCLEUS_CANDIDATES
    g = torch.Generator().manual_seed(11)
    scales = [8.0, 0.05, 8.0, 1.0, 0.05, 3.0]  # peaked rows keep a small nucleus, flat ones one over the candidates
    logits = torch.stack([s * torch.randn(vocab, generator=g) for s in scales])
    configs = [
        GenerateConfig(top_p=0.9),
        GenerateConfig(top_p=0.9),
        GenerateConfig(top_p=1e-88),
        GenerateConfig(top_p=0.5, temperature=0.7),
        GenerateConfig(top_p=0.99, top_k=NUCLEUS_CANDIDATES + 100),
        GenerateConfig(top_p=1.0, top_k=50),
    ]
    probs = sampling_probs_batch(logits, configs)
    supports = []
    for i, cfg in enumerate(configs):
        expected = reference_probs(logits[i], cfg)
        assert probs[i].tolist() == pytest.approx(expected, abs=1e-6), i
        supports.append(sum(p > 0 for p in expected))
    assert supports[1] > NUCLEUS_CANDIDATES and supports[4] > NUCLEUS_CANDIDATES and supports[0] < NUCLEUS_CANDIDATES


def test_masks_hold_in_the_batch():
    rows = mixed_batch()
    for step in range(20):
        tokens, _ = sample(batch_logits(13, seed=step), rows)
        assert tokens[6] not in EOS and tokens[7] not in EOS  # min_new_tokens
        assert tokens[8] != 7  # logit_bias -100 bans
        assert tokens[9] in {2, 5, 30, 31, 40}  # the grammar
        assert tokens[11] == 50  # logit_bias +100 forces


def _seeded_tokens(position: int, others: list[SamplingParams], steps: int = 30) -> list[int]:
    target = row(GenerateConfig(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1), 1234)
    batch = others[:position] + [target] + others[position:]
    tokens = []
    for step in range(steps):
        logits = batch_logits(len(batch), seed=100 + step)
        logits[position] = batch_logits(1, seed=5000 + step)[0]  # the target's row is the same in every batch
        sampled, _ = sample(logits, batch)
        tokens.append(sampled[position])
        target = dataclasses.replace(
            target, num_output_tokens=target.num_output_tokens + 1, token_ids=target.token_ids + (sampled[position],)
        )
        batch[position] = target
    return tokens


def test_a_seeded_request_draws_the_same_tokens_in_any_batch():
    alone = _seeded_tokens(0, [])
    assert _seeded_tokens(3, mixed_batch()) == alone
    assert _seeded_tokens(1, mixed_batch()[5:8]) == alone
    assert len(set(alone)) > 3  # it really sampled


@pytest.mark.parametrize("logprobs", [None, 3])
def test_one_device_to_host_copy_per_step(monkeypatch, logprobs):
    rows = [dataclasses.replace(p, config=dataclasses.replace(p.config, logprobs=logprobs)) for p in mixed_batch()]
    copies = []
    for name in ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            copies.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tokens, lps = sample(batch_logits(13), rows)
    monkeypatch.undo()
    assert copies == ["tolist"]
    assert len(tokens) == 13 and all(0 <= t < VOCAB for t in tokens)
    assert all((lp is None) == (logprobs is None) for lp in lps)
    if logprobs is not None:
        raw = torch.log_softmax(batch_logits(13), -1)
        for i, (token, lp) in enumerate(zip(tokens, lps, strict=True)):
            assert set(lp) == set(torch.topk(raw[i], logprobs).indices.tolist()) | {token}
            assert all(v == pytest.approx(float(raw[i, t]), abs=1e-6) for t, v in lp.items())


@pytest.mark.parametrize(
    "extreme",
    [
        GenerateConfig(top_p=1e-88),
        GenerateConfig(temperature=1e-40),
        GenerateConfig(temperature=1e-40, top_p=1e-88, top_k=3),
        GenerateConfig(temperature=100.0, top_p=1e-88, repetition_penalty=100.0),
    ],
)
def test_extreme_rows_next_to_normal_ones_never_give_nan(monkeypatch, extreme):
    rows = mixed_batch()
    rows.insert(4, row(extreme, 99))
    logits = batch_logits(len(rows), seed=3)
    seen = []
    real = sampler._draw
    monkeypatch.setattr(sampler, "_draw", lambda p, u, f: seen.append(p) or real(p, u, f))
    tokens, _ = sample(logits, rows)
    assert not torch.isnan(seen[0]).any()
    assert tokens[4] == int(reference_masked(logits[4], rows[4]).argmax())


def test_a_row_without_any_allowed_token_does_not_fail_the_batch():
    rows = mixed_batch()
    rows[3] = row(rows[3].config, 3, grammar=FakeGrammar([]))  # nothing allowed: every logit -inf
    tokens, _ = sample(batch_logits(13), rows)
    assert len(tokens) == 13 and all(0 <= t < VOCAB for t in tokens)
