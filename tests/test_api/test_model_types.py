"""The MODEL_TYPE registry and checkpoint detection (rtp_mm/model_types.py).

The list of names is parsed out of the seed's Config.md, so a name missing from the registry fails here. Detection is
checked on the golden checkpoints' real config.json files (read only) and on small hand-written HF-style configs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from rtp_mm.errors import ConfigError
from rtp_mm.model_types import (
    check_model_type_matches,
    detect_model_type,
    families_compatible,
    model_types,
    read_config_json,
    resolve_model_type,
)
from rtp_mm_testing.shared import GOLDEN, SEED_CONFIG


def seed_model_type_names() -> list[str]:
    """The MODEL_TYPE names listed in Config.md ("`MODEL_TYPE` currently supports `a``b`...")."""
    for line in SEED_CONFIG.read_text().splitlines():
        if "`MODEL_TYPE` currently supports" in line:
            return [n for n in re.findall(r"`([^`]+)`", line) if n != "MODEL_TYPE"]
    raise AssertionError("Config.md has no MODEL_TYPE support line")


SEED_NAMES = seed_model_type_names()


# --- the registry -----------------------------------------------------------------------------------------------------


def test_config_md_lists_30_distinct_names() -> None:
    assert len(SEED_NAMES) == 30
    assert len(set(SEED_NAMES)) == 30


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_seed_name_resolves_to_a_family(name: str) -> None:
    assert name in model_types()
    info = resolve_model_type(name)
    assert info.name == name
    assert re.fullmatch(r"[a-z][a-z0-9_]*", info.family), info.family  # a family of rtp_mm.llm.models.FAMILIES


def test_registry_entries_are_keyed_by_their_name() -> None:
    for key, info in model_types().items():
        assert info.name == key


ALIAS_GROUPS = [
    ("chatglm", "chat_glm"),
    ("chatglm2", "chat_glm_2"),
    ("chatglm3", "chat_glm_3"),
    ("wizardcoder", "gpt_bigcode"),
    ("qwen_7b", "qwen_13b", "qwen_1b8"),
    ("sgpt_bloom", "bloom"),
    ("xverse", "aquila", "internlm", "llama"),
]


@pytest.mark.parametrize("names", ALIAS_GROUPS, ids=["/".join(g) for g in ALIAS_GROUPS])
def test_aliases_share_a_family(names: tuple[str, ...]) -> None:
    families = {resolve_model_type(n).family for n in names}
    assert len(families) == 1, families


# Names whose architectures differ (different weights, positions or a vision tower): never one family.
DISTINCT_PAIRS = [
    ("chatglm", "chatglm2"),
    ("chatglm", "glm_130b"),
    ("llama", "llava"),
    ("llama", "baichuan"),
    ("qwen_7b", "qwen_2"),
    ("qwen_7b", "qwen_vl"),
    ("gpt_bigcode", "starcoder2"),
    ("bloom", "falcon"),
    ("gpt_neox", "phi"),
    ("chatglm3", "chatglm4v"),
]


@pytest.mark.parametrize("a,b", DISTINCT_PAIRS)
def test_distinct_architectures_have_distinct_families(a: str, b: str) -> None:
    assert resolve_model_type(a).family != resolve_model_type(b).family


def test_vision_and_embedding_flags() -> None:
    vision = {n for n in SEED_NAMES if resolve_model_type(n).vision}
    assert vision == {"llava", "qwen_vl", "chatglm4v"}
    assert resolve_model_type("sgpt_bloom_vector").embedding
    assert not resolve_model_type("llama").embedding


def test_unknown_name_lists_every_supported_name() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_model_type("gpt5")
    message = str(info.value)
    assert message.startswith("MODEL_TYPE='gpt5'")
    for name in SEED_NAMES:
        assert re.search(rf"\b{name}\b", message), name


def test_unknown_name_uses_the_given_variable() -> None:
    with pytest.raises(ConfigError, match=r"^model_type='x'"):
        resolve_model_type("x", variable="model_type")


# --- detection on the golden checkpoints ------------------------------------------------------------------------------

GOLDEN_EXPECTED = {
    "aquila": "aquila",
    "baichuan_7b": "baichuan",
    "baichuan_13b": "baichuan",
    "baichuan2_7b": "baichuan",
    "baichuan2_13b": "baichuan",
    "chatglm2": "chatglm2",
    "chatglm3": "chatglm2",  # same config shape as chatglm2; the families are compatible
    "chatglm_v1": "chatglm",
    "glm4v": "chatglm4v",
    "internlm_7b": "internlm",
    "qwen_7b": "qwen_7b",
    "qwen_vl": "qwen_vl",
    "sgpt_bloom_vector": "bloom",
    "xverse": "xverse",
}

# The MODEL_TYPE a user would set for each golden case: it must pass the consistency check.
GOLDEN_MODEL_TYPE = {
    "aquila": "aquila",
    "baichuan_7b": "baichuan",
    "baichuan_13b": "baichuan",
    "baichuan2_7b": "baichuan",
    "baichuan2_13b": "baichuan",
    "chatglm2": "chatglm2",
    "chatglm3": "chatglm3",
    "chatglm_v1": "chatglm",
    "glm4v": "chatglm4v",
    "internlm_7b": "internlm",
    "qwen_7b": "qwen_7b",
    "qwen_vl": "qwen_vl",
    "sgpt_bloom_vector": "sgpt_bloom_vector",
    "xverse": "xverse",
}


def golden_config(case: str) -> dict:
    config = read_config_json(GOLDEN / case / "checkpoint")
    assert config is not None, f"{case} has no checkpoint/config.json"
    return config


def test_every_golden_checkpoint_is_covered() -> None:
    cases = {p.parent.parent.name for p in GOLDEN.glob("*/checkpoint/config.json")}
    assert cases == set(GOLDEN_EXPECTED)


@pytest.mark.parametrize("case,expected", sorted(GOLDEN_EXPECTED.items()))
def test_detect_golden_checkpoint(case: str, expected: str) -> None:
    assert detect_model_type(golden_config(case)) == expected


def test_chatglm2_and_chatglm3_goldens_detect_the_chatglm2_family() -> None:
    for case in ("chatglm2", "chatglm3"):
        detected = detect_model_type(golden_config(case))
        assert resolve_model_type(detected).family == resolve_model_type("chatglm2").family


@pytest.mark.parametrize("case,model_type", sorted(GOLDEN_MODEL_TYPE.items()))
def test_golden_checkpoint_matches_its_model_type(case: str, model_type: str) -> None:
    check_model_type_matches(model_type, golden_config(case), str(GOLDEN / case / "checkpoint"))


# --- detection on hand-written HF configs -----------------------------------------------------------------------------

HF_CONFIGS = [
    # (architectures entry, HF model_type, expected MODEL_TYPE)
    ("LlamaForCausalLM", "llama", "llama"),
    ("Qwen2ForCausalLM", "qwen2", "qwen_2"),
    ("GemmaForCausalLM", "gemma", "gemma"),
    ("GPTBigCodeForCausalLM", "gpt_bigcode", "gpt_bigcode"),
    ("Starcoder2ForCausalLM", "starcoder2", "starcoder2"),
    ("GPTNeoXForCausalLM", "gpt_neox", "gpt_neox"),
    ("FalconForCausalLM", "falcon", "falcon"),
    ("MPTForCausalLM", "mpt", "mpt"),
    ("PhiForCausalLM", "phi", "phi"),
    ("BloomForCausalLM", "bloom", "bloom"),
    ("LlavaForConditionalGeneration", "llava", "llava"),
    ("MixFormerSequentialForCausalLM", "mixformer-sequential", "phi"),
    ("MptForCausalLM", "mpt", "mpt"),
    ("RWForCausalLM", "RefinedWeb", "falcon"),
]
HF_IDS = [c[0] for c in HF_CONFIGS]


@pytest.mark.parametrize("arch,hf_type,expected", HF_CONFIGS, ids=HF_IDS)
def test_detect_hf_config(arch: str, hf_type: str, expected: str) -> None:
    assert detect_model_type({"architectures": [arch], "model_type": hf_type, "hidden_size": 64}) == expected


@pytest.mark.parametrize("arch,hf_type,expected", HF_CONFIGS, ids=HF_IDS)
def test_detect_from_architectures_alone(arch: str, hf_type: str, expected: str) -> None:
    assert detect_model_type({"architectures": [arch]}) == expected


@pytest.mark.parametrize("arch,hf_type,expected", HF_CONFIGS, ids=HF_IDS)
def test_detect_from_hf_model_type_alone(arch: str, hf_type: str, expected: str) -> None:
    assert detect_model_type({"model_type": hf_type}) == expected


@pytest.mark.parametrize("arch,hf_type,expected", HF_CONFIGS, ids=HF_IDS)
def test_hf_config_matches_its_model_type(arch: str, hf_type: str, expected: str) -> None:
    check_model_type_matches(expected, {"architectures": [arch], "model_type": hf_type}, "/ckpt")


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "llama"),  # unknown arch: model_type
        ({"architectures": ["RWForCausalLM"], "model_type": "RefinedWebModel"}, "falcon"),  # legacy Falcon
        ({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama"}, "llava"),
        ({"architectures": ["QWenLMHeadModel"], "visual": {"image_size": 448}}, "qwen_vl"),
        ({"model_type": "qwen", "visual": {"image_size": 448}}, "qwen_vl"),
        ({"model_type": "qwen"}, "qwen_7b"),
        ({"model_type": "chatglm", "multi_query_group_num": 2}, "chatglm2"),
        ({"model_type": "chatglm", "vision_config": {}}, "chatglm4v"),
        ({"model_type": "chatglm", "position_encoding_2d": True}, "chatglm"),
    ],
)
def test_detect_special_cases(config: dict, expected: str) -> None:
    assert detect_model_type(config) == expected


@pytest.mark.parametrize(
    "config",
    [{}, {"architectures": []}, {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}, {"x": 1}],
)
def test_detect_unknown_returns_none(config: dict) -> None:
    assert detect_model_type(config) is None


def test_undetectable_checkpoint_passes_the_check() -> None:
    check_model_type_matches("llama", {"model_type": "t5"}, "/ckpt")


# --- check_model_type_matches -----------------------------------------------------------------------------------------

MISMATCHES = [
    # (MODEL_TYPE, golden case or hand-written config, detected name that the message must mention)
    ("qwen_7b", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "llama"),
    ("bloom", "aquila", "aquila"),
    ("chatglm", "chatglm2", "chatglm2"),  # GLM v1 (2D RoPE) cannot serve a v2 checkpoint
    ("chatglm2", "chatglm_v1", "chatglm"),
    ("chat_glm_3", "chatglm_v1", "chatglm"),
    ("llava", "qwen_vl", "qwen_vl"),
    ("qwen_2", "qwen_7b", "qwen_7b"),
    ("starcoder2", {"architectures": ["GPTBigCodeForCausalLM"]}, "gpt_bigcode"),
    ("gemma", "xverse", "xverse"),
    ("baichuan", "glm4v", "chatglm4v"),
]


@pytest.mark.parametrize("model_type,source,detected", MISMATCHES, ids=[f"{m[0]}-{m[2]}" for m in MISMATCHES])
def test_mismatch_is_a_friendly_config_error(model_type: str, source, detected: str) -> None:
    config = golden_config(source) if isinstance(source, str) else source
    with pytest.raises(ConfigError) as info:
        check_model_type_matches(model_type, config, "/models/ckpt")
    message = str(info.value)
    assert f"MODEL_TYPE={model_type!r}" in message
    assert repr(detected) in message
    assert "CHECKPOINT_PATH='/models/ckpt'" in message


COMPATIBLE = [
    ("llama", "xverse"),
    ("llama", "aquila"),
    ("llama", "internlm_7b"),
    ("internlm", "aquila"),
    ("xverse", "internlm_7b"),
    ("qwen_13b", "qwen_7b"),
    ("qwen_1b8", "qwen_7b"),
    ("chat_glm", "chatglm_v1"),
    ("glm_130b", "chatglm_v1"),
    ("chat_glm_2", "chatglm2"),
    ("chatglm3", "chatglm2"),
    ("chatglm2", "chatglm3"),
    ("chat_glm_3", "chatglm3"),
    ("sgpt_bloom", "sgpt_bloom_vector"),
    ("bloom", "sgpt_bloom_vector"),
]


@pytest.mark.parametrize("model_type,case", COMPATIBLE)
def test_compatible_names_pass(model_type: str, case: str) -> None:
    check_model_type_matches(model_type, golden_config(case), str(GOLDEN / case / "checkpoint"))


def test_wizardcoder_serves_a_gpt_bigcode_checkpoint() -> None:
    check_model_type_matches("wizardcoder", {"architectures": ["GPTBigCodeForCausalLM"]}, "/ckpt")


def test_check_rejects_unknown_model_type() -> None:
    with pytest.raises(ConfigError, match="MODEL_TYPE='gpt5'"):
        check_model_type_matches("gpt5", {"architectures": ["LlamaForCausalLM"]}, "/ckpt")


def test_families_compatible_is_symmetric() -> None:
    families = sorted({info.family for info in model_types().values()})
    for a in families:
        assert families_compatible(a, a)
        for b in families:
            assert families_compatible(a, b) == families_compatible(b, a), (a, b)


# --- read_config_json -------------------------------------------------------------------------------------------------


def test_read_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_config_json(tmp_path) == {"model_type": "llama"}
    assert read_config_json(str(tmp_path)) == {"model_type": "llama"}


def test_read_config_json_absent(tmp_path: Path) -> None:
    assert read_config_json(tmp_path) is None  # folder without config.json
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert read_config_json(gguf) is None  # a single-file checkpoint
    assert read_config_json(tmp_path / "missing") is None


@pytest.mark.parametrize("text", ["{not json", '["LlamaForCausalLM"]', '"llama"'])
def test_read_config_json_invalid(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError) as info:
        read_config_json(tmp_path)
    assert "CHECKPOINT_PATH" in str(info.value)
    assert "config.json" in str(info.value)


# --- the family table -------------------------------------------------------------------------------------------------


def test_every_declared_adapter_and_encoder_resolves():
    """A family names its tokenizer adapter and vision loader as "module:function": each must import."""
    from rtp_mm.llm.models import FAMILIES
    from rtp_mm.llm.models.family import resolve

    for family in FAMILIES.values():
        for target in filter(None, (family.tokenizer, family.vision)):
            assert callable(resolve(target)), (family.name, target)
    assert {f.name for f in FAMILIES.values() if f.vision} == {"llava", "qwen_vl", "chatglm4v"}


def test_a_new_family_is_one_declaration():
    """Declaring a family (here: registering one at run time, as its own file plus one registry line would) makes
    its MODEL_TYPE resolvable, detectable from a config.json and compatible with its layout."""
    from rtp_mm.llm.models import FAMILIES, llama
    from rtp_mm.llm.models.family import Family

    family = Family("tinyllama", ("tiny_llama",), llama.build, architectures={"TinyForCausalLM": "tiny_llama"})
    family = dataclasses.replace(family, layout="llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILIES, family.name, family)
        assert resolve_model_type("tiny_llama").family == "tinyllama"
        assert detect_model_type({"architectures": ["TinyForCausalLM"]}) == "tiny_llama"
        check_model_type_matches("llama", {"architectures": ["TinyForCausalLM"]}, "/ckpt")  # same layout
    with pytest.raises(ConfigError, match="tiny_llama"):
        resolve_model_type("tiny_llama")
