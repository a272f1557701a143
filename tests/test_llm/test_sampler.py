"""sample(): greedy, per-request seeded RNG, the distributions of temperature / top-k / top-p, penalties,
min_new_tokens and logprobs.

Oracles are computed in plain Python (``math.exp`` softmax, sorting by hand). The distribution tests draw
N = 20000 tokens from a FIXED logit vector and require every token frequency f_i to lie within 5 standard deviations
of its expected probability p_i: |f_i - p_i| <= 5 * sqrt(p_i * (1 - p_i) / N) (binomial count). With at most 8
tokens the chance of a false failure is below 8 * 6e-7 (and the seed is fixed anyway, so the test is deterministic);
each test also checks that the wrong distribution it guards against lies well outside that band, so it can fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from rtp_mm.llm.engine import sampler
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.request import Request
from rtp_mm.llm.engine.sampler import apply_penalties, sample
from rtp_mm.llm.engine.scheduler import SamplingParams, scheduled_seq

N_DRAWS = 20000
# Not sorted, so that a top-k / top-p mask scattered back to the wrong positions shows up.
LOGITS = [0.5, 2.0, -1.0, 1.2, 0.0, 1.6, -2.0, 0.9]


def make_request(config: GenerateConfig, prompt_ids=(1,), output_ids=(), eos=(), seed: int = 0) -> Request:
    # Seeded like LLMEngine.make_request: the request's own CPU generator.
    generator = torch.Generator(device="cpu")
    generator.manual_seed(config.random_seed if config.random_seed is not None else seed)
    return Request(
        request_id=0,
        prompt_ids=list(prompt_ids),
        config=config,
        max_total_len=10_000,
        eos_token_ids=frozenset(eos),
        output_ids=list(output_ids),
        generator=generator,
    )


def params(req: Request) -> SamplingParams:
    """The sampling parameters the scheduler hands the runner for a request's next token."""
    return scheduled_seq(req, req.num_tokens - 1, 1).sampling


def make_req(config: GenerateConfig, prompt_ids=(1,), output_ids=(), eos=(), seed: int = 0) -> SamplingParams:
    return params(make_request(config, prompt_ids, output_ids, eos, seed))


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def frequencies(config: GenerateConfig, n: int = N_DRAWS) -> list[float]:
    req = make_req(config, seed=20240601)
    rows = torch.tensor(LOGITS, dtype=torch.float32).expand(n, len(LOGITS)).contiguous()
    tokens, _ = sample(rows, [req] * n)  # one request per row: n draws from its generator
    counts = [0] * len(LOGITS)
    for t in tokens:
        counts[t] += 1
    return [c / n for c in counts]


def band(p: float, n: int = N_DRAWS) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def assert_matches(freqs: list[float], expected: list[float], n: int = N_DRAWS) -> None:
    for i, (f, p) in enumerate(zip(freqs, expected, strict=True)):
        if p == 0.0:
            assert f == 0.0, f"token {i} is outside the support but was drawn ({f:.4f})"
        else:
            assert abs(f - p) <= band(p, n), f"token {i}: frequency {f:.4f}, expected {p:.4f} +- {band(p, n):.4f}"


def assert_distinguishable(expected: list[float], wrong: list[float], n: int = N_DRAWS) -> None:
    """The alternative a bug would produce lies far outside the acceptance band (the test has power)."""
    assert max(abs(a - b) - 2 * band(max(a, 1e-9), n) for a, b in zip(expected, wrong, strict=True)) > 0


def top_p_oracle(probs: list[float], top_p: float) -> list[float]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:  # smallest prefix of the sorted tokens whose mass reaches top_p
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]


# ---- greedy and seeding -------------------------------------------------------------------------------------------
def test_greedy_equals_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    expected = [max(range(50), key=lambda j, row=row: row[j]) for row in logits.tolist()]
    greedy_k1 = [make_req(GenerateConfig(top_k=1)) for _ in range(6)]
    assert sample(logits, greedy_k1)[0] == expected
    # Mixed batch (temperature 0 rows next to a sampling row) takes the general path: still argmax.
    mixed = [make_req(GenerateConfig(temperature=0.0)) for _ in range(5)] + [make_req(GenerateConfig())]
    assert sample(logits, mixed)[0][:5] == expected[:5]


def _seeded_run(seed: int, batch_size: int) -> list[int]:
    config = GenerateConfig(random_seed=seed, top_k=0, top_p=0.9, temperature=0.8)
    req = make_request(config)
    others = [
        make_request(GenerateConfig(random_seed=7)),
        make_request(GenerateConfig(top_k=1)),
        make_request(GenerateConfig(temperature=1.3, top_k=5), seed=99),
        make_request(GenerateConfig(repetition_penalty=1.2), seed=5),
    ]
    tokens = []
    for step in range(40):
        row = torch.randn(32, generator=torch.Generator().manual_seed(1000 + step))
        position = step % batch_size
        rows = [torch.randn(32) for _ in range(batch_size)]
        rows[position] = row
        batch = others[: batch_size - 1]
        batch = batch[:position] + [req] + batch[position:]
        sampled, _ = sample(torch.stack(rows), [params(r) for r in batch])
        tokens.append(sampled[position])
        req.output_ids.append(sampled[position])
        for other, token in zip(batch, sampled, strict=True):
            if other is not req:
                other.output_ids.append(token)
    return tokens


def test_seeded_request_is_independent_of_batch_composition():
    alone = _seeded_run(seed=1234, batch_size=1)
    assert _seeded_run(seed=1234, batch_size=5) == alone
    assert _seeded_run(seed=1234, batch_size=3) == alone
    assert _seeded_run(seed=4321, batch_size=1) != alone  # the seed matters (40 draws from ~10 tokens)


# ---- distributions ------------------------------------------------------------------------------------------------
def test_temperature_scaling_matches_softmax_of_scaled_logits():
    temperature = 0.7
    expected = softmax([v / temperature for v in LOGITS])
    assert_distinguishable(expected, softmax(LOGITS))
    assert_matches(frequencies(GenerateConfig(temperature=temperature, top_k=0, top_p=1.0)), expected)


def test_top_k_draws_only_from_the_top_k_renormalised():
    k = 3
    top = sorted(range(len(LOGITS)), key=lambda i: -LOGITS[i])[:k]
    assert sorted(top) == [1, 3, 5]
    mass = sum(math.exp(LOGITS[i]) for i in top)
    expected = [math.exp(v) / mass if i in top else 0.0 for i, v in enumerate(LOGITS)]
    assert_matches(frequencies(GenerateConfig(top_k=k, top_p=1.0)), expected)


def test_top_p_draws_from_the_smallest_nucleus():
    probs = softmax(LOGITS)
    top_p = 0.8
    expected = top_p_oracle(probs, top_p)
    support = [i for i, p in enumerate(expected) if p > 0]
    # Unambiguous nucleus: the 4 best tokens hold 0.852 >= 0.8 and the 3 best only 0.736.
    assert support == [1, 3, 5, 7]
    assert_matches(frequencies(GenerateConfig(top_k=0, top_p=top_p)), expected)


def _expected_probs(temperature: float, top_k: int, top_p: float) -> list[float]:
    """Oracle in the HF warper order: temperature, then top-k, then top-p on what is left, renormalised."""
    scaled = [v / temperature for v in LOGITS]
    if top_k:
        top = set(sorted(range(len(LOGITS)), key=lambda i: -LOGITS[i])[:top_k])
        scaled = [v if i in top else -math.inf for i, v in enumerate(scaled)]
    return top_p_oracle(softmax(scaled), top_p)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.0, 3, 1.0),
        (1.0, 0, 0.8),
        (1.5, 5, 0.7),
        (0.5, 0, 0.6),  # nucleus {1, 5} after temperature; it would be {1, 5, 3} before it
        (2.0, 0, 0.6),
        (0.5, 0, 0.05),
        (2.0, 100, 0.999),
    ],
)
def test_the_distribution_handed_to_the_draw_is_exact(monkeypatch, temperature, top_k, top_p):
    # Exact (no sampling noise) complement of the statistical tests: spy on the probabilities the draw gets.
    seen = []
    real = sampler._draw

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(sampler, "_draw", spy)
    config = GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    sample(torch.tensor([LOGITS]), [make_req(config)])
    ((probs,),) = seen  # [1, vocab]: the one sampled row
    assert probs.tolist() == pytest.approx(_expected_probs(temperature, top_k, top_p), abs=1e-6)


def test_temperature_then_top_k_then_top_p():
    # The nucleus is taken on the temperature-scaled, top-k-truncated distribution.
    temperature, k, top_p = 1.5, 5, 0.7
    expected = _expected_probs(temperature, k, top_p)
    assert sum(p > 0 for p in expected) == 3  # masses 0.312, 0.552, 0.735 >= 0.7
    n = 12000  # enough to tell it from the same nucleus without temperature / top-k (0.425 vs 0.472 for token 1)
    assert_distinguishable(expected, top_p_oracle(softmax(LOGITS), top_p), n)
    assert_matches(frequencies(GenerateConfig(temperature=temperature, top_k=k, top_p=top_p), n), expected, n)


# ---- penalties ----------------------------------------------------------------------------------------------------
def test_repetition_penalty_hf_semantics():
    logits = [1.5, -0.5, 2.0, -1.0, 0.0, 3.0, 0.25, -2.0]
    penalty = 1.3
    prompt, output = [0, 1, 4, 1], [6, 3, 6]
    req = make_req(GenerateConfig(repetition_penalty=penalty), prompt_ids=prompt, output_ids=output)
    got = apply_penalties(torch.tensor(logits), req).tolist()
    seen = set(prompt) | set(output)  # once per token id, however often it occurs
    expected = [(v / penalty if v > 0 else v * penalty) if i in seen else v for i, v in enumerate(logits)]
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[5] == 3.0 and got[2] == 2.0  # unseen tokens untouched


def test_repetition_penalty_can_change_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    req = make_req(GenerateConfig(top_k=1, repetition_penalty=1.2), prompt_ids=[0])
    assert sample(logits, [req])[0] == [1]  # 2.0 / 1.2 < 1.9


def test_repetition_penalty_ignores_out_of_vocab_placeholder_ids():
    # Image placeholders may be out of the vocabulary (llava uses -200): they must neither wrap around to a real
    # token (-200 would index token vocab - 200) nor raise.
    vocab = 256
    req = make_req(GenerateConfig(repetition_penalty=2.0), prompt_ids=[5, -200, -200, 7, vocab + 3])
    got = apply_penalties(torch.ones(vocab), req)
    assert [i for i, v in enumerate(got.tolist()) if v != 1.0] == [5, 7]


def test_presence_and_frequency_penalties_over_the_output():
    logits = [1.0, 0.5, -0.5, 2.0, 0.0, 1.5]
    presence, frequency = 0.4, 0.3
    prompt, output = [4, 4, 1], [3, 3, 3, 0, 2]
    req = make_req(
        GenerateConfig(presence_penalty=presence, frequency_penalty=frequency), prompt_ids=prompt, output_ids=output
    )
    got = apply_penalties(torch.tensor(logits), req).tolist()
    expected = [v - frequency * output.count(i) - (presence if i in output else 0.0) for i, v in enumerate(logits)]
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[4] == 0.0 and got[1] == 0.5  # prompt-only tokens are not penalised


def test_negative_presence_penalty_encourages_repeats():
    req = make_req(GenerateConfig(top_k=1, presence_penalty=-2.0), output_ids=[2])
    assert sample(torch.tensor([[1.0, 0.0, -0.5]]), [req])[0] == [2]


# ---- min_new_tokens -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [GenerateConfig(top_k=1, min_new_tokens=3), GenerateConfig(min_new_tokens=3)])
def test_min_new_tokens_masks_eos(config):
    eos = {2, 5}
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5, -1.0, 8.0]])  # EOS tokens dominate
    for num_out in range(3):
        req = make_req(config, output_ids=[1] * num_out, eos=eos, seed=num_out)
        tokens, _ = sample(logits.expand(500, 6).contiguous(), [req] * 500)
        assert not eos & set(tokens), f"EOS drawn after {num_out} tokens"
    req = make_req(config, output_ids=[1] * 3, eos=eos)
    tokens, _ = sample(logits.expand(200, 6).contiguous(), [req] * 200)
    assert set(tokens) & eos


def test_out_of_vocab_eos_does_not_break_the_step():
    # eos_token_id is user-supplied (validated >= 0 only): the whole batch must not fail on an IndexError.
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    req = make_req(GenerateConfig(top_k=1, min_new_tokens=2), eos=[1000])
    assert sample(logits, [req])[0] == [1]


# ---- logprobs -----------------------------------------------------------------------------------------------------
def _log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    lse = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - lse for v in values]


def test_logprobs_are_top_n_of_the_raw_distribution_plus_the_chosen_token():
    logits = [5.0, 4.0, 3.0, 2.9, 0.0, -1.0]
    # A huge repetition penalty on tokens 0..2 makes token 3 (outside the raw top 3) the greedy choice; its logprob
    # and everyone else's must still come from the RAW logits, before penalties and temperature.
    config = GenerateConfig(top_k=1, repetition_penalty=100.0, logprobs=3, temperature=0.5)
    req = make_req(config, prompt_ids=[0, 1, 2])
    plain = make_req(GenerateConfig(top_k=1))
    tokens, logprobs = sample(torch.tensor([logits, logits]), [req, plain])
    assert tokens == [3, 0]
    expected = _log_softmax(logits)
    assert set(logprobs[0]) == {0, 1, 2, 3}
    for token, value in logprobs[0].items():
        assert value == pytest.approx(expected[token], abs=1e-5)
    assert logprobs[1] is None


def test_logprobs_zero_returns_only_the_chosen_token():
    logits = [0.1, 2.0, -0.3, 1.0]
    req = make_req(GenerateConfig(logprobs=0, temperature=2.0, top_p=0.5))
    tokens, logprobs = sample(torch.tensor([logits]), [req])
    assert list(logprobs[0]) == tokens
    assert logprobs[0][tokens[0]] == pytest.approx(_log_softmax(logits)[tokens[0]], abs=1e-5)


def test_logprobs_on_the_plain_greedy_path():
    logits = [0.1, 2.0, -0.3, 1.0, 1.9]
    req = make_req(GenerateConfig(top_k=1, logprobs=2))
    tokens, logprobs = sample(torch.tensor([logits]), [req])
    expected = _log_softmax(logits)
    assert tokens == [1]
    assert logprobs[0] == pytest.approx({1: expected[1], 4: expected[4]}, abs=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        GenerateConfig(top_p=1e-88),  # below float32's smallest number: compares as 0
        GenerateConfig(temperature=1e-40),  # logits / T overflow to inf
        GenerateConfig(temperature=1e-40, top_p=1e-88, top_k=3),
    ],
)
def test_extreme_but_valid_settings_draw_the_most_likely_token(config):
    # Found by the server fuzz test: these settings made softmax NaN and failed the whole engine step.
    logits = torch.tensor([LOGITS])
    tokens, _ = sample(logits, [make_req(config)])
    assert tokens == [LOGITS.index(max(LOGITS))]
