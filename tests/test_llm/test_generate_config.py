"""GenerateConfig: RTP-LLM's defaults, from_dict, and one GenerateConfigError naming the field per invalid value.

The expected defaults are RTP-LLM's own (its 2024 ``maga_transformer/config/generate_config.py``, recorded in
docs/reference/rtp-llm-behaviour.md section 1.3), written out here rather than read from the class.
"""

from __future__ import annotations

import math

import pytest

from rtp_mm.errors import ErrorCode, GenerateConfigError, InvalidRequest
from rtp_mm.llm.engine.generate_config import GenerateConfig

RTP_LLM_DEFAULTS = {
    "max_new_tokens": 1000,
    "min_new_tokens": 0,
    "num_beams": 1,
    "num_return_sequences": 0,
    "top_k": 0,
    "top_p": 0.95,
    "temperature": 1.0,
    "repetition_penalty": 1.0,
    "random_seed": None,
    "stop_words_str": [],
    "stop_words_list": [],
    "print_stop_words": False,
    "eos_token_id": None,
    "timeout_ms": -1,
    "return_incremental": False,
    "adapter_name": None,
}


def test_defaults_equal_rtp_llm():
    config = GenerateConfig()
    for name, value in RTP_LLM_DEFAULTS.items():
        assert getattr(config, name) == value, name
    # rtp-mm's additions are off by default.
    assert (config.presence_penalty, config.frequency_penalty) == (0.0, 0.0)
    assert (config.logprobs, config.ignore_eos) == (None, False)
    assert not config.is_greedy()  # native default decoding is top-p 0.95 sampling
    config.validate()


def test_list_defaults_are_not_shared():
    a, b = GenerateConfig(), GenerateConfig()
    a.stop_words_str.append("x")
    assert b.stop_words_str == []


@pytest.mark.parametrize("changes", [{"top_k": 1}, {"temperature": 0.0}, {"temperature": 0}])
def test_is_greedy(changes):
    assert GenerateConfig.from_dict(changes).is_greedy()


def test_from_dict_ignores_unknown_keys_unless_strict():
    data = {"max_new_tokens": 7, "top_k": 3, "chat_id": "abc", "return_logits": True}
    config = GenerateConfig.from_dict(data)
    assert (config.max_new_tokens, config.top_k) == (7, 3)
    assert not hasattr(config, "chat_id")
    with pytest.raises(GenerateConfigError) as info:
        GenerateConfig.from_dict(data, strict=True)
    assert "chat_id" in str(info.value) and "return_logits" in str(info.value)
    assert GenerateConfig.from_dict({"top_k": 3}, strict=True).top_k == 3


def test_from_dict_rejects_a_non_object():
    for data in (None, [], "top_k=1", 3):
        with pytest.raises(GenerateConfigError):
            GenerateConfig.from_dict(data)


def test_integers_are_accepted_for_float_fields():
    config = GenerateConfig.from_dict({"top_p": 1, "temperature": 2, "repetition_penalty": 1})
    assert config.top_p == 1.0 and isinstance(config.top_p, float)
    assert isinstance(config.temperature, float) and isinstance(config.repetition_penalty, float)


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_p", 1.0),
        ("top_p", 1e-6),
        ("temperature", 0.0),
        ("temperature", 100.0),
        ("repetition_penalty", 100.0),
        ("repetition_penalty", 0.01),
        ("presence_penalty", -2.0),
        ("presence_penalty", 2.0),
        ("frequency_penalty", -2),
        ("top_k", 100000),
        ("max_new_tokens", 1),
        ("random_seed", 0),
        ("random_seed", 2**64 - 1),
        ("logprobs", 0),
        ("logprobs", 20),
        ("timeout_ms", 0),
        ("timeout_ms", 5000),
        ("eos_token_id", 0),
        ("stop_words_list", [[1, 2], [3]]),
        ("stop_words_str", ["</s>", "\n\n"]),
        ("num_return_sequences", 4),
        ("adapter_name", "lora-a"),
    ],
)
def test_boundary_values_are_accepted(field, value):
    assert getattr(GenerateConfig.from_dict({field: value}), field) == value


INVALID = [
    ("max_new_tokens", -1),  # 0 is valid: the prefill only (prompt logprobs, loss)
    ("max_new_tokens", -5),
    ("max_new_tokens", 1.5),
    ("max_new_tokens", "10"),
    ("max_new_tokens", True),
    ("min_new_tokens", -1),
    ("num_beams", 0),
    ("num_beams", 2),
    ("num_return_sequences", -1),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", "0.9"),
    ("top_p", True),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", math.inf),
    ("temperature", None),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 101.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3),
    ("frequency_penalty", math.nan),
    ("random_seed", -1),
    ("random_seed", 1.5),
    ("random_seed", "42"),
    ("random_seed", 2**64),  # torch.Generator.manual_seed cannot take it
    ("stop_words_str", "</s>"),
    ("stop_words_str", [1]),
    ("stop_words_str", [""]),
    ("stop_words_list", [1, 2]),
    ("stop_words_list", [[]]),
    ("stop_words_list", [[-1]]),
    ("stop_words_list", [["a"]]),
    ("stop_words_list", [[1.0]]),
    ("stop_words_list", [[True]]),
    ("print_stop_words", 1),
    ("ignore_eos", "yes"),
    ("return_incremental", 0),
    ("eos_token_id", -1),
    ("eos_token_id", "2"),
    ("timeout_ms", 1.5),
    ("timeout_ms", "100"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 21),
    ("calculate_loss", 3),
    ("calculate_loss", -1),
    ("calculate_loss", True),
    ("return_logits", 1),
    ("select_tokens_id", [1.0]),
    ("select_tokens_id", 3),
    ("select_tokens_str", [""]),
    ("adapter_name", 3),
]


@pytest.mark.parametrize("field, value", INVALID)
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(GenerateConfigError) as info:
        GenerateConfig.from_dict({field: value})
    assert field in str(info.value)
    assert isinstance(info.value, InvalidRequest)
    assert info.value.error_code == ErrorCode.GENERATE_CONFIG_FORMAT_ERROR == 516
    # updated() validates the same way.
    with pytest.raises(GenerateConfigError) as info:
        GenerateConfig().updated(**{field: value})
    assert field in str(info.value)


def test_updated_returns_a_new_validated_copy():
    base = GenerateConfig()
    new = base.updated(top_k=5, temperature=1)
    assert (new.top_k, new.temperature) == (5, 1.0) and base.top_k == 0
