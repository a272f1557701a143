"""Speculative decoding's variables (SP_TYPE, SP_MODEL_TYPE, SP_CHECKPOINT_PATH, SP_WEIGHT_TYPE, SP_MIN_TOKEN_MATCH,
SP_MAX_TOKEN_MATCH) and their effect on GEN_NUM_PER_CIRCLE's default: parsed into ``EngineConfig.speculative``, each
bad value a ConfigError naming its variable. (GEN_NUM_PER_CIRCLE > 1 without speculation is refused when the engine
is built: test_speculative.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from rtp_mm import EngineConfig, Settings, SpeculativeConfig, WeightType
from rtp_mm.errors import ConfigError


def parse(**env: str) -> Settings:
    return Settings.from_env(env)


def rejected(env: dict[str, str], *fragments: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_unset_means_no_speculation_and_one_token_per_step():
    settings = parse()
    assert settings.engine.speculative is None
    assert settings.model.gen_num_per_circle == 1


def test_prompt_lookup_needs_no_model_and_proposes_5_tokens_by_default():
    settings = parse(SP_TYPE="prompt_lookup")
    assert settings.engine.speculative == SpeculativeConfig("prompt_lookup")
    assert not settings.engine.speculative.uses_draft_model
    assert settings.model.gen_num_per_circle == 5  # RTP-LLM's default with speculation
    assert parse(SP_TYPE="Prompt_Lookup", GEN_NUM_PER_CIRCLE="3").model.gen_num_per_circle == 3
    assert parse(SP_TYPE="deterministic").engine.speculative.sp_type == "prompt_lookup"  # RTP-LLM's name for it


def test_prompt_lookup_ngram_lengths():
    sp = parse(SP_TYPE="prompt_lookup").engine.speculative
    assert (sp.sp_min_token_match, sp.sp_max_token_match) == (2, 4)
    sp = parse(SP_TYPE="prompt_lookup", SP_MIN_TOKEN_MATCH="1", SP_MAX_TOKEN_MATCH="3").engine.speculative
    assert (sp.sp_min_token_match, sp.sp_max_token_match) == (1, 3)


def test_a_draft_checkpoint_means_vanilla(tmp_path: Path):
    settings = parse(SP_CHECKPOINT_PATH=str(tmp_path), SP_MODEL_TYPE="llama", SP_WEIGHT_TYPE="int8")
    sp = settings.engine.speculative
    assert (sp.sp_type, sp.sp_model_type, sp.sp_checkpoint_path) == ("vanilla", "llama", str(tmp_path))
    assert sp.sp_weight_type is WeightType.INT8 and sp.uses_draft_model
    assert parse(SP_TYPE="VANILLA", SP_CHECKPOINT_PATH=str(tmp_path)).engine.speculative.sp_weight_type is None


@pytest.mark.parametrize(
    "env,fragments",
    [
        ({"SP_TYPE": "medusa"}, ("SP_TYPE='medusa'", "prompt_lookup")),
        ({"SP_TYPE": "vanilla"}, ("needs SP_CHECKPOINT_PATH",)),
        ({"SP_MODEL_TYPE": "llama"}, ("needs SP_CHECKPOINT_PATH",)),
        ({"SP_CHECKPOINT_PATH": "/no/such/draft"}, ("SP_CHECKPOINT_PATH='/no/such/draft'", "does not exist")),
        ({"SP_CHECKPOINT_PATH": "hf://org/draft"}, ("SP_CHECKPOINT_PATH", "local path")),
        ({"SP_TYPE": "prompt_lookup", "SP_WEIGHT_TYPE": "int8"}, ("uses no draft model", "SP_WEIGHT_TYPE")),
        ({"SP_TYPE": "prompt_lookup", "GEN_NUM_PER_CIRCLE": "0"}, ("GEN_NUM_PER_CIRCLE='0'", ">= 1")),
        ({"SP_TYPE": "prompt_lookup", "SP_MIN_TOKEN_MATCH": "two"}, ("SP_MIN_TOKEN_MATCH='two'", "integer")),
        ({"SP_TYPE": "prompt_lookup", "SP_MAX_TOKEN_MATCH": "0"}, ("SP_MAX_TOKEN_MATCH=0", ">= 1")),
        ({"SP_TYPE": "prompt_lookup", "SP_MIN_TOKEN_MATCH": "5"}, ("SP_MIN_TOKEN_MATCH=5 > SP_MAX_TOKEN_MATCH=4",)),
    ],
)
def test_bad_values_name_their_variable(env, fragments):
    rejected(env, *fragments)


def test_bad_draft_model_type_and_weight_type(tmp_path: Path):
    rejected({"SP_CHECKPOINT_PATH": str(tmp_path), "SP_MODEL_TYPE": "gpt5"}, "SP_MODEL_TYPE='gpt5'")
    rejected({"SP_CHECKPOINT_PATH": str(tmp_path), "SP_WEIGHT_TYPE": "int3"}, "SP_WEIGHT_TYPE='int3'")
    rejected({"SP_TYPE": "prompt_lookup", "SP_CHECKPOINT_PATH": str(tmp_path)}, "SP_CHECKPOINT_PATH is set")
    rejected({"SP_CHECKPOINT_PATH": str(tmp_path), "SP_MAX_TOKEN_MATCH": "3"}, "SP_TYPE=prompt_lookup only")


def test_engine_config_takes_a_speculative_config_only():
    assert EngineConfig(speculative=SpeculativeConfig("prompt_lookup")).speculative.sp_type == "prompt_lookup"
    with pytest.raises(ConfigError, match="speculative='prompt_lookup' must be a SpeculativeConfig"):
        EngineConfig(speculative="prompt_lookup")
