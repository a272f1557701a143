"""Environment parsing and config dataclasses (rtp_mm/config.py).

Every variable of the seed's Config.md (plus rtp-mm's own server variables) is parsed from an explicit mapping, never
the process environment. Invalid values must raise ConfigError naming the variable, the value and what is accepted.
The expected values come from Config.md and section 4 of the behaviour reference, not from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from rtp_mm.config import (
    EngineConfig,
    ModelConfig,
    ServerConfig,
    Settings,
    WeightType,
    configure_logging,
    trt_cache_path,
)
from rtp_mm.errors import ConfigError
from rtp_mm.parallel_config import ParallelConfig


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder


@pytest.fixture
def other_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "other"
    folder.mkdir()
    return folder


def parse(**env: str) -> Settings:
    return Settings.from_env(env)


def assert_rejected(env: dict[str, str], *fragments: str) -> str:
    """The env must fail with a ConfigError whose message contains every fragment."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    return message


# --- defaults ---------------------------------------------------------------------------------------------------------


def test_defaults_when_unset() -> None:
    settings = Settings.from_env({})
    model, engine, server = settings.model, settings.engine, settings.server
    assert model.model_type == ""
    assert model.ckpt_path == ""
    assert model.tokenizer_path == ""
    assert model.weight_type is WeightType.FP16
    assert model.act_type is None  # derived from weight_type later
    assert model.max_seq_len == 0
    assert model.seq_size_per_block == 8
    assert model.gen_num_per_circle == 1
    assert model.ptuning_path is None
    assert model.lora_infos is None

    assert engine.concurrency_limit == 32
    assert engine.int8_kv_cache is False
    assert engine.kv_cache_mem_mb == -1
    assert engine.pre_allocate_op_mem is True
    assert engine.tp_split_emb_and_lmhead is True
    assert engine.reuse_cache is False
    assert engine.extra_data_path == ""
    assert engine.vit_trt is False
    assert engine.ft_disable_custom_ar is False
    assert engine.load_ckpt_num_process == 1
    assert engine.max_num_batched_tokens == 0
    assert engine.step_token_budget == 512  # automatic on CPU
    assert engine.device == "cpu"

    assert server.start_port == 8088
    assert server.host == "0.0.0.0"
    assert server.api_key is None
    assert server.log_level == "WARNING"  # Config.md note 1


def test_blank_values_count_as_unset() -> None:
    settings = parse(MAX_SEQ_LEN="", WEIGHT_TYPE="  ", CONCURRENCY_LIMIT="", LOG_LEVEL=" ", MODEL_TYPE="")
    assert settings.model.max_seq_len == 0
    assert settings.model.weight_type is WeightType.FP16
    assert settings.model.model_type == ""
    assert settings.engine.concurrency_limit == 32
    assert settings.server.log_level == "WARNING"


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    for obj, name in ((settings, "model"), (settings.engine, "reuse_cache"), (settings.server, "start_port")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)


# --- paths ------------------------------------------------------------------------------------------------------------


def test_checkpoint_path_local_dir(ckpt: Path) -> None:
    model = parse(CHECKPOINT_PATH=str(ckpt)).model
    assert model.ckpt_path == str(ckpt)
    assert model.tokenizer_path == str(ckpt)  # TOKENIZER_PATH defaults to CHECKPOINT_PATH


def test_checkpoint_path_surrounding_whitespace_is_stripped(ckpt: Path) -> None:
    assert parse(CHECKPOINT_PATH=f" {ckpt} ").model.ckpt_path == str(ckpt)


def test_checkpoint_path_missing_rejected(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert_rejected({"CHECKPOINT_PATH": missing}, "CHECKPOINT_PATH", repr(missing), "does not exist", "local")


@pytest.mark.parametrize("remote", ["hf://x", "oss://bucket/model", "https://huggingface.co/x"])
def test_checkpoint_path_remote_rejected(remote: str) -> None:
    assert_rejected({"CHECKPOINT_PATH": remote}, "CHECKPOINT_PATH", repr(remote), "local path")


def test_tokenizer_path_explicit(ckpt: Path, other_dir: Path) -> None:
    model = parse(CHECKPOINT_PATH=str(ckpt), TOKENIZER_PATH=str(other_dir)).model
    assert model.ckpt_path == str(ckpt)
    assert model.tokenizer_path == str(other_dir)


def test_tokenizer_path_without_checkpoint(other_dir: Path) -> None:
    model = parse(TOKENIZER_PATH=str(other_dir)).model
    assert model.tokenizer_path == str(other_dir)
    assert model.ckpt_path == ""


def test_tokenizer_path_missing_rejected(ckpt: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "tok")
    assert_rejected({"CHECKPOINT_PATH": str(ckpt), "TOKENIZER_PATH": missing}, "TOKENIZER_PATH", repr(missing), "local")


def test_tokenizer_path_remote_rejected(ckpt: Path) -> None:
    assert_rejected({"CHECKPOINT_PATH": str(ckpt), "TOKENIZER_PATH": "hf://tok"}, "TOKENIZER_PATH", "'hf://tok'")


def test_extra_data_path(other_dir: Path, tmp_path: Path) -> None:
    assert parse(EXTRA_DATA_PATH=str(other_dir)).engine.extra_data_path == str(other_dir)
    missing = str(tmp_path / "vit")
    assert_rejected({"EXTRA_DATA_PATH": missing}, "EXTRA_DATA_PATH", repr(missing), "does not exist")
    assert_rejected({"EXTRA_DATA_PATH": "oss://vit"}, "EXTRA_DATA_PATH", "'oss://vit'", "local path")


def test_ptuning_path(other_dir: Path, tmp_path: Path) -> None:
    assert parse(PTUNING_PATH=str(other_dir)).model.ptuning_path == str(other_dir)
    a_file = tmp_path / "prefix.bin"
    a_file.write_bytes(b"")
    assert_rejected({"PTUNING_PATH": str(a_file)}, "PTUNING_PATH", repr(str(a_file)), "directory")
    missing = str(tmp_path / "ptuning")
    assert_rejected({"PTUNING_PATH": missing}, "PTUNING_PATH", repr(missing), "does not exist")
    assert_rejected({"PTUNING_PATH": "hf://p"}, "PTUNING_PATH", "'hf://p'", "local path")


# --- MODEL_TYPE -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "chat_glm_2", "qwen_vl", "sgpt_bloom_vector", "chatglm4v"])
def test_model_type_accepted(name: str) -> None:
    # Every one of the 30 names is covered in test_model_types.py; here the env path is exercised.
    assert parse(MODEL_TYPE=name).model.model_type == name


def test_model_type_unknown_lists_supported_names() -> None:
    from rtp_mm.model_types import model_types

    message = assert_rejected({"MODEL_TYPE": "gpt5"}, "MODEL_TYPE", "'gpt5'", "supported")
    for name in model_types():
        assert name in message


def test_model_type_is_case_sensitive() -> None:
    # RTP-LLM looks the name up verbatim in its registry.
    assert_rejected({"MODEL_TYPE": "LLAMA"}, "MODEL_TYPE", "'LLAMA'")


def test_model_type_error_comes_before_path_errors(tmp_path: Path) -> None:
    assert_rejected({"MODEL_TYPE": "gpt5", "CHECKPOINT_PATH": str(tmp_path / "nope")}, "MODEL_TYPE")


# --- integers ---------------------------------------------------------------------------------------------------------

INTEGER_VARS = [
    # (variable, accessor, good value, parsed, bad values, lower bound)
    ("MAX_SEQ_LEN", lambda s: s.model.max_seq_len, "4096", 4096, ["abc", "1.5", "-1", "2k"], ">= 0"),
    ("SEQ_SIZE_PER_BLOCK", lambda s: s.model.seq_size_per_block, "16", 16, ["0", "-8", "x"], ">= 1"),
    ("GEN_NUM_PER_CIRCLE", lambda s: s.model.gen_num_per_circle, "5", 5, ["0", "five"], ">= 1"),
    ("CONCURRENCY_LIMIT", lambda s: s.engine.concurrency_limit, "8", 8, ["0", "-3", "many", "1e3"], ">= 1"),
    ("LOAD_CKPT_NUM_PROCESS", lambda s: s.engine.load_ckpt_num_process, "4", 4, ["-1", "auto"], ">= 0"),
    ("MAX_NUM_BATCHED_TOKENS", lambda s: s.engine.max_num_batched_tokens, "512", 512, ["-1", "lots"], ">= 0"),
    ("START_PORT", lambda s: s.server.start_port, "9000", 9000, ["-1", "http", "80.5"], ""),
]


@pytest.mark.parametrize("var,get,good,parsed,bad,bound", INTEGER_VARS, ids=[v[0] for v in INTEGER_VARS])
def test_integer_variables(var, get, good, parsed, bad, bound) -> None:
    assert get(parse(**{var: good})) == parsed
    assert get(parse(**{var: f" {good} "})) == parsed
    for value in bad:
        assert_rejected({var: value}, var, repr(value), "integer", bound)


def test_max_seq_len_zero_means_model_default() -> None:
    assert parse(MAX_SEQ_LEN="0").model.max_seq_len == 0


def test_load_ckpt_num_process_zero_means_automatic() -> None:
    assert parse(LOAD_CKPT_NUM_PROCESS="0").engine.load_ckpt_num_process == 0


@pytest.mark.parametrize("value,parsed", [("1024", 1024), ("-1", -1), ("0", 0)])
def test_kv_cache_mem_mb(value: str, parsed: int) -> None:
    # > 0: exactly that many MiB; otherwise sized from free memory (any integer is accepted).
    assert parse(KV_CACHE_MEM_MB=value).engine.kv_cache_mem_mb == parsed


@pytest.mark.parametrize("value", ["1.5", "1GB", "lots"])
def test_kv_cache_mem_mb_rejected(value: str) -> None:
    assert_rejected({"KV_CACHE_MEM_MB": value}, "KV_CACHE_MEM_MB", repr(value), "integer")


@pytest.mark.parametrize("value", ["0", "65535", "8088"])
def test_start_port_range_accepted(value: str) -> None:
    assert parse(START_PORT=value).server.start_port == int(value)


def test_start_port_above_range_rejected() -> None:
    assert_rejected({"START_PORT": "70000"}, "START_PORT", "70000", "65535")


# --- weight and activation types --------------------------------------------------------------------------------------

WEIGHT_ALIASES = [
    ("FP16", WeightType.FP16),
    ("fp16", WeightType.FP16),
    ("Float16", WeightType.FP16),
    ("float16", WeightType.FP16),
    ("BF16", WeightType.BF16),
    ("bf16", WeightType.BF16),
    ("bfloat16", WeightType.BF16),
    ("BP16", WeightType.BF16),  # RTP-LLM's typo alias
    ("FP32", WeightType.FP32),
    ("fp32", WeightType.FP32),
    ("FLOAT32", WeightType.FP32),
    ("INT8", WeightType.INT8),
    ("int8", WeightType.INT8),
    (" Int8 ", WeightType.INT8),
]


@pytest.mark.parametrize("value,expected", WEIGHT_ALIASES)
def test_weight_type_aliases(value: str, expected: WeightType) -> None:
    assert parse(WEIGHT_TYPE=value).model.weight_type is expected


@pytest.mark.parametrize("value", ["INT3", "INT4", "fp8", "16"])
def test_weight_type_rejected_names_variable_and_accepted_values(value: str) -> None:
    assert_rejected({"WEIGHT_TYPE": value}, "WEIGHT_TYPE", repr(value), "FP16", "BF16", "FP32", "INT8")


def test_legacy_int8_mode() -> None:
    assert parse(INT8_MODE="1").model.weight_type is WeightType.INT8
    assert parse(INT8_MODE="0").model.weight_type is WeightType.FP16
    # An explicit WEIGHT_TYPE wins over the legacy flag.
    assert parse(INT8_MODE="1", WEIGHT_TYPE="bf16").model.weight_type is WeightType.BF16
    assert_rejected({"INT8_MODE": "maybe"}, "INT8_MODE", "'maybe'")


@pytest.mark.parametrize("value,expected", [("fp16", WeightType.FP16), ("BF16", WeightType.BF16), ("float32", "FP32")])
def test_act_type(value: str, expected: WeightType | str) -> None:
    assert parse(ACT_TYPE=value).model.act_type == WeightType(expected)


def test_act_type_must_be_float() -> None:
    assert_rejected({"ACT_TYPE": "INT8"}, "ACT_TYPE", "'INT8'", "FP16", "BF16", "FP32")


def test_act_type_unknown_rejected() -> None:
    assert_rejected({"ACT_TYPE": "fp64"}, "ACT_TYPE", "'fp64'", "FP16")


def test_act_type_independent_of_weight_type() -> None:
    model = parse(WEIGHT_TYPE="int8", ACT_TYPE="bf16").model
    assert model.weight_type is WeightType.INT8
    assert model.act_type is WeightType.BF16


def test_weight_type_enum_helpers() -> None:
    assert WeightType.parse(WeightType.BF16) is WeightType.BF16
    assert [t.is_float for t in WeightType] == [t is not WeightType.INT8 for t in WeightType]


# --- flags ------------------------------------------------------------------------------------------------------------

FLAG_VARS = [
    # (variable, accessor, default)
    ("INT8_KV_CACHE", lambda s: s.engine.int8_kv_cache, False),
    ("PRE_ALLOCATE_OP_MEM", lambda s: s.engine.pre_allocate_op_mem, True),
    ("TP_SPLIT_EMB_AND_LMHEAD", lambda s: s.engine.tp_split_emb_and_lmhead, True),
    ("REUSE_CACHE", lambda s: s.engine.reuse_cache, False),
    ("VIT_TRT", lambda s: s.engine.vit_trt, False),
]


@pytest.mark.parametrize("var,get,default", FLAG_VARS, ids=[v[0] for v in FLAG_VARS])
def test_flag_variables(var, get, default) -> None:
    assert get(Settings.from_env({})) is default
    for value in ("1", "true", "TRUE", "yes", "on"):
        assert get(parse(**{var: value})) is True, value
    for value in ("0", "false", "False", "no", "off"):
        assert get(parse(**{var: value})) is False, value
    for value in ("2", "maybe", "-1"):
        assert_rejected({var: value}, var, repr(value), "1/0")


def test_ft_disable_custom_ar_is_exactly_1() -> None:
    """The seed: 1 disables the custom all-reduce, any other value enables it (so "2" starts)."""
    assert parse(FT_DISABLE_CUSTOM_AR="1").engine.ft_disable_custom_ar is True
    for value in ("0", "2", "true", "yes", "anything"):
        assert parse(FT_DISABLE_CUSTOM_AR=value).engine.ft_disable_custom_ar is False, value
    assert Settings.from_env({}).engine.ft_disable_custom_ar is False


def test_parallel_variables() -> None:
    """TP_SIZE alone: a local launch; torchrun's variables: a launched rank; TP_SIZE must equal WORLD_SIZE."""
    assert Settings.from_env({}).engine.parallel == ParallelConfig()
    local = parse(TP_SIZE="4").engine.parallel
    assert (local.tp_size, local.rank, local.launched, local.master_port) == (4, 0, False, 0)
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    p = parse(**torchrun).engine.parallel
    assert (p.tp_size, p.rank, p.local_rank, p.master_addr, p.master_port, p.launched) == (
        2,
        1,
        1,
        "10.0.0.1",
        29500,
        True,
    )
    assert parse(WORLD_SIZE="2", WORLD_RANK="1", MASTER_PORT="29500").engine.parallel.rank == 1  # RTP-LLM's name
    assert_rejected({"TP_SIZE": "2", "WORLD_SIZE": "4", "MASTER_PORT": "1"}, "TP_SIZE=2", "WORLD_SIZE=4")
    assert_rejected({"TP_SIZE": "0"}, "TP_SIZE")
    assert_rejected({"TP_SIZE": "2", "RANK": "2"}, "RANK=2", "TP_SIZE=2")
    assert_rejected({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_PORT")


# --- LOG_LEVEL, LORA_INFO, server extras ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "info", "Debug"])
def test_log_level_accepted(value: str) -> None:
    assert parse(LOG_LEVEL=value).server.log_level == value.upper()


@pytest.mark.parametrize("value", ["VERBOSE", "WARN", "5"])
def test_log_level_rejected(value: str) -> None:
    assert_rejected({"LOG_LEVEL": value}, "LOG_LEVEL", repr(value), "TRACE", "DEBUG", "INFO", "WARNING", "ERROR")


def test_lora_info(other_dir: Path, tmp_path: Path) -> None:
    second = tmp_path / "lora2"
    second.mkdir()
    value = json.dumps({"a": str(other_dir), "b": str(second)})
    lora = parse(LORA_INFO=value).model.lora_infos
    assert dict(lora) == {"a": str(other_dir), "b": str(second)}
    with pytest.raises(TypeError):
        lora["c"] = str(other_dir)  # read-only view: the config stays frozen


def test_lora_info_empty_object_means_none() -> None:
    assert parse(LORA_INFO="{}").model.lora_infos is None


@pytest.mark.parametrize("value", ["not json", "{'a': 'b'}", "{"])
def test_lora_info_invalid_json(value: str) -> None:
    assert_rejected({"LORA_INFO": value}, "LORA_INFO", repr(value), "JSON")


@pytest.mark.parametrize("value", ['["a"]', '{"a": 1}', '"path"', '{"a": null}'])
def test_lora_info_not_a_name_to_path_object(value: str) -> None:
    assert_rejected({"LORA_INFO": value}, "LORA_INFO", repr(value), "adapter names to paths")


def test_lora_info_paths_must_be_local(tmp_path: Path) -> None:
    missing = str(tmp_path / "adapter")
    assert_rejected({"LORA_INFO": json.dumps({"a": missing})}, "LORA_INFO['a']", repr(missing), "does not exist")
    assert_rejected({"LORA_INFO": json.dumps({"b": "hf://x"})}, "LORA_INFO['b']", "'hf://x'", "local path")


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:1"])
def test_device_accepted(value: str) -> None:
    assert parse(DEVICE=value).engine.device == value


def test_device_rejected() -> None:
    assert_rejected({"DEVICE": "tpu"}, "DEVICE", "'tpu'", "cpu", "cuda")


def test_host_and_api_key() -> None:
    server = parse(HOST="127.0.0.1", API_KEY="secret").server
    assert server.host == "127.0.0.1"
    assert server.api_key == "secret"


def test_full_environment(ckpt: Path, other_dir: Path) -> None:
    settings = parse(
        MODEL_TYPE="llama",
        CHECKPOINT_PATH=str(ckpt),
        TOKENIZER_PATH=str(other_dir),
        MAX_SEQ_LEN="2048",
        WEIGHT_TYPE="bf16",
        CONCURRENCY_LIMIT="4",
        INT8_KV_CACHE="1",
        KV_CACHE_MEM_MB="256",
        PRE_ALLOCATE_OP_MEM="0",
        TP_SPLIT_EMB_AND_LMHEAD="0",
        REUSE_CACHE="1",
        EXTRA_DATA_PATH=str(other_dir),
        VIT_TRT="1",
        FT_DISABLE_CUSTOM_AR="1",
        LOG_LEVEL="INFO",
        LOAD_CKPT_NUM_PROCESS="2",
        START_PORT="9001",
        SEQ_SIZE_PER_BLOCK="32",
        GEN_NUM_PER_CIRCLE="3",
        PTUNING_PATH=str(other_dir),
        LORA_INFO=json.dumps({"x": str(other_dir)}),
    )
    model, engine = settings.model, settings.engine
    assert (model.model_type, model.ckpt_path, model.tokenizer_path) == ("llama", str(ckpt), str(other_dir))
    assert (model.max_seq_len, model.weight_type, model.seq_size_per_block) == (2048, WeightType.BF16, 32)
    assert (model.gen_num_per_circle, model.ptuning_path, dict(model.lora_infos)) == (
        3,
        str(other_dir),
        {"x": str(other_dir)},
    )
    assert (engine.concurrency_limit, engine.int8_kv_cache, engine.kv_cache_mem_mb) == (4, True, 256)
    assert (engine.pre_allocate_op_mem, engine.tp_split_emb_and_lmhead, engine.reuse_cache) == (False, False, True)
    assert (engine.extra_data_path, engine.vit_trt, engine.ft_disable_custom_ar) == (str(other_dir), True, True)
    assert engine.load_ckpt_num_process == 2
    assert (settings.server.log_level, settings.server.start_port) == ("INFO", 9001)
    assert ModelConfig.from_env({"MODEL_TYPE": "llama", "CHECKPOINT_PATH": str(ckpt)}).ckpt_path == str(ckpt)


# --- ModelConfig built directly (offline API) -------------------------------------------------------------------------


def test_model_config_defaults_and_frozen() -> None:
    config = ModelConfig()
    assert (config.model_type, config.ckpt_path, config.tokenizer_path) == ("", "", "")
    assert config.weight_type is WeightType.FP16
    assert config.act_type is None
    assert (config.max_seq_len, config.seq_size_per_block, config.gen_num_per_circle) == (0, 8, 1)
    assert config.ptuning_path is None and config.lora_infos is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_seq_len = 10


def test_model_config_tokenizer_path_fallback(ckpt: Path, other_dir: Path) -> None:
    assert ModelConfig(ckpt_path=str(ckpt)).tokenizer_path == str(ckpt)
    assert ModelConfig(ckpt_path=str(ckpt), tokenizer_path=str(other_dir)).tokenizer_path == str(other_dir)


def test_model_config_accepts_pathlib_paths(ckpt: Path, other_dir: Path) -> None:
    config = ModelConfig(ckpt_path=ckpt, ptuning_path=other_dir, lora_infos={"a": other_dir})
    assert config.ckpt_path == str(ckpt)
    assert config.tokenizer_path == str(ckpt)
    assert config.ptuning_path == str(other_dir)
    assert dict(config.lora_infos) == {"a": str(other_dir)}


@pytest.mark.parametrize(
    "value,expected",
    [("bf16", WeightType.BF16), ("INT8", WeightType.INT8), ("float32", WeightType.FP32), (WeightType.FP16, "FP16")],
)
def test_model_config_weight_type_strings(value, expected) -> None:
    assert ModelConfig(weight_type=value).weight_type is WeightType(expected)


def test_model_config_act_type_strings() -> None:
    assert ModelConfig(act_type="bfloat16").act_type is WeightType.BF16


def test_model_config_lora_infos_copied_and_read_only(other_dir: Path) -> None:
    source = {"a": str(other_dir)}
    config = ModelConfig(lora_infos=source)
    source["b"] = "/elsewhere"
    assert dict(config.lora_infos) == {"a": str(other_dir)}
    with pytest.raises(TypeError):
        config.lora_infos["b"] = str(other_dir)


MISSING = "<missing path>"  # replaced by a path under tmp_path that does not exist

BAD_MODEL_CONFIGS = [
    # (field, value, fragment the message must also contain)
    ("model_type", "gpt5", "'gpt5'"),
    ("ckpt_path", MISSING, "does not exist"),
    ("ckpt_path", "hf://x", "'hf://x'"),
    ("tokenizer_path", MISSING, "does not exist"),
    ("weight_type", "INT3", "'INT3'"),
    ("weight_type", None, "None"),
    ("act_type", "int8", "INT8"),
    ("act_type", "fp64", "'fp64'"),
    ("max_seq_len", -1, "-1"),
    ("max_seq_len", "2048", "'2048'"),
    ("max_seq_len", 1.5, "1.5"),
    ("max_seq_len", True, "True"),
    ("seq_size_per_block", 0, ">= 1"),
    ("gen_num_per_circle", 0, ">= 1"),
    ("ptuning_path", MISSING, "does not exist"),
    ("ptuning_path", 42, "42"),
    ("lora_infos", {"a": 1}, "{'a': 1}"),
    ("lora_infos", ["a"], "['a']"),
    ("lora_infos", {"a": MISSING}, "lora_infos['a']"),
]


@pytest.mark.parametrize(
    "field_name,value,fragment", BAD_MODEL_CONFIGS, ids=[f"{c[0]}={c[1]!r}" for c in BAD_MODEL_CONFIGS]
)
def test_model_config_bad_field_names_field(field_name: str, value, fragment: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    if value == MISSING:
        value = missing
    elif isinstance(value, dict):
        value = {k: missing if v == MISSING else v for k, v in value.items()}
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{field_name: value})
    message = str(info.value)
    assert message.startswith(f"{field_name}"), message
    assert fragment in message, message


# --- EngineConfig / ServerConfig built directly -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"concurrency_limit": 0}, "CONCURRENCY_LIMIT"),
        ({"load_ckpt_num_process": -1}, "LOAD_CKPT_NUM_PROCESS"),
        ({"max_num_batched_tokens": -1}, "MAX_NUM_BATCHED_TOKENS"),
        ({"kv_cache_mem_mb": "1024"}, "KV_CACHE_MEM_MB"),
        ({"reuse_cache": "0"}, "REUSE_CACHE"),
        ({"vit_trt": 1}, "VIT_TRT"),
    ],
)
def test_engine_config_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("port", [-1, 65536, "80", True])
def test_server_config_port_validation(port) -> None:
    with pytest.raises(ConfigError, match="START_PORT"):
        ServerConfig(start_port=port)


# --- configure_logging ------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("TRACE", logging.DEBUG),  # Python has no TRACE level
        ("DEBUG", logging.DEBUG),
        ("INFO", logging.INFO),
        ("WARNING", logging.WARNING),
        ("ERROR", logging.ERROR),
        ("CRITICAL", logging.CRITICAL),
    ],
)
def test_configure_logging_sets_root_level(value: str, expected: int, restore_root_logger) -> None:
    configure_logging(parse(LOG_LEVEL=value).server.log_level)
    assert restore_root_logger.level == expected


def test_configure_logging_default_is_warning(restore_root_logger) -> None:
    configure_logging(Settings.from_env({}).server.log_level)
    assert restore_root_logger.level == logging.WARNING


def test_configure_logging_case_insensitive(restore_root_logger) -> None:
    configure_logging("info")
    assert restore_root_logger.level == logging.INFO


def test_configure_logging_rejects_unknown(restore_root_logger) -> None:
    before = restore_root_logger.level
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        configure_logging("LOUD")
    assert restore_root_logger.level == before


# --- vision backends --------------------------------------------------------------------------------------------------


def test_vision_backend_variables(tmp_path: Path) -> None:
    engine = Settings.from_env({}).engine
    assert (engine.vision_backend, engine.vit_trt_batch, engine.vit_trt_workspace_mb) == ("torch", (1, 8, 16), 4096)
    assert engine.vision_cache_path() == trt_cache_path()
    assert trt_cache_path({"RTP_MM_CACHE_DIR": str(tmp_path)}) == tmp_path / "trt"
    assert parse(VIT_TRT="1").engine.vision_backend == "tensorrt"
    assert parse(VIT_BACKEND="onnxruntime").engine.vision_backend == "onnxruntime"
    engine = parse(VIT_BACKEND="TensorRT", VIT_TRT_BATCH="2, 4, 32", TRT_CACHE_PATH=str(tmp_path / "c")).engine
    assert (engine.vision_backend, engine.vit_trt_batch) == ("tensorrt", (2, 4, 32))
    assert engine.vision_cache_path() == tmp_path / "c"  # need not exist yet: the first build creates it


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"VIT_BACKEND": "openvino"}, "VIT_BACKEND='openvino'; accepted: torch, onnxruntime, tensorrt"),
        ({"VIT_TRT": "1", "VIT_BACKEND": "onnxruntime"}, "VIT_TRT=1 and VIT_BACKEND=onnxruntime contradict"),
        ({"VIT_TRT_BATCH": "8"}, "VIT_TRT_BATCH='8'; accepted: three integers min,opt,max"),
        ({"VIT_TRT_BATCH": "8,4,16"}, "1 <= min <= opt <= max"),
        ({"VIT_TRT_BATCH": "0,4,16"}, "1 <= min <= opt <= max"),
        ({"VIT_TRT_WORKSPACE_MB": "0"}, "VIT_TRT_WORKSPACE_MB"),
        ({"TRT_CACHE_PATH": "s3://bucket/trt"}, "TRT_CACHE_PATH='s3://bucket/trt' must be a local folder"),
    ],
)
def test_vision_backend_variables_rejected(env: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert fragment in str(info.value)
