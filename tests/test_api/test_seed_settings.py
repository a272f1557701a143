"""No seed setting is silently ignored (issue 15): each works as documented, or start-up fails naming it.

The seed's Config.md lists environment variables (its two tables and its notes) and ModelConfig fields.
``test_every_seed_setting_has_a_probe`` parses it, so a seed entry without a probe here fails. Every probe starts
tiny models with two values of its setting and shows an observable difference (tokens, logprobs, KV blocks, dtypes,
aux_info, logs, a server's log) or a start-up refusal whose message names the setting. Variables go through
``LLM.from_env`` (the server's parser), fields through ``ModelConfig``. WAITING would name settings whose documented
effect belongs to open work, with the reason (none now: the tensor-parallel flags have TP_SIZE=2 probes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch

import rtp_mm.config
import rtp_mm.speculative_config
from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import RtpMmError
from rtp_mm.speculative_config import SpeculativeConfig
from rtp_mm_testing.llava import SIZES, image, processor, save_llava, tiny_llava
from rtp_mm_testing.oracle import TINY_LLAMA, random_prompts, tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.shared import GOLDEN, REPO_ROOT, SEED_CONFIG, require

PROMPTS = random_prompts(320, [10, 7, 13], seed=0)
GREEDY = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True, logprobs=2)
BASE_ENV = {"KV_CACHE_MEM_MB": "4", "WEIGHT_TYPE": "FP32"}  # fp32 on CPU: the weights as stored
ENV_OF = {  # the seed's ModelConfig fields that also have a variable
    "ckpt_path": "CHECKPOINT_PATH",
    "tokenizer_path": "TOKENIZER_PATH",
    "model_type": "MODEL_TYPE",
    "max_seq_len": "MAX_SEQ_LEN",
    "weight_type": "WEIGHT_TYPE",
}
WAITING: dict[str, str] = {}


def seed_settings() -> tuple[set[str], set[str]]:
    """(variables, ModelConfig fields) of the seed's Config.md: every `UPPER_CASE` name of the variable part (table rows
    and notes such as `LOG_LEVEL=INFO`), every first-column name of the ModelConfig table."""
    text = require(SEED_CONFIG).read_text()
    variables_part, _, fields_part = text.partition("# ModelConfig")
    variables = set(re.findall(r"`([A-Z][A-Z0-9_]+)(?:=[^`]*)?`", variables_part))
    fields = set(re.findall(r"^\| `([a-z_]+)` \|", fields_part, flags=re.M))
    return variables, fields


@dataclass(frozen=True)
class Kit:
    """Tiny checkpoints, tokenizers and adapters shared by the probes (built once per module)."""

    llama_a: Path  # sharded (LOAD_CKPT_NUM_PROCESS)
    llama_b: Path
    tok_a: Path
    tok_b: Path
    glm2: Path  # the golden ChatGLM2 checkpoint
    glm2_rope: Path  # ChatGLM2 with rope_ratio 4: chatglm2 interpolates positions, chatglm3 scales the base
    glm2_ptuning: Path  # a P-tuning v2 folder for the golden ChatGLM2 checkpoint
    lora: Path  # a PEFT LoRA adapter of llama_a
    missing: Path
    root: Path  # room for a probe's own files


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    root = tmp_path_factory.mktemp("seed")
    tiny_llama(seed=1).save_pretrained(str(root / "llama_a"), max_shard_size="100KB")
    tiny_llama(root / "llama_b", seed=2)
    tiny_bpe_tokenizer(root / "tok_a", ["the quick brown fox jumps over the lazy dog"] * 3)
    tiny_bpe_tokenizer(root / "tok_b", ["quick quick fox fox brown brown", "over over dog lazy"] * 3)
    shutil.copytree(require(GOLDEN / "chatglm2" / "checkpoint"), root / "glm2_rope")
    config = json.loads((root / "glm2_rope" / "config.json").read_text())
    (root / "glm2_rope" / "config.json").write_text(json.dumps({**config, "rope_ratio": 4.0}))
    (root / "ptuning").mkdir()
    width = config["num_layers"] * 2 * config["multi_query_group_num"] * config["kv_channels"]
    prefix = torch.randn(5, width, generator=torch.Generator().manual_seed(0))
    torch.save({"transformer.prefix_encoder.embedding.weight": prefix}, root / "ptuning" / "p.bin")
    return Kit(
        llama_a=root / "llama_a",
        llama_b=root / "llama_b",
        tok_a=root / "tok_a",
        tok_b=root / "tok_b",
        glm2=require(GOLDEN / "chatglm2" / "checkpoint"),
        glm2_rope=root / "glm2_rope",
        glm2_ptuning=root / "ptuning",
        lora=_lora_adapter(root / "llama_a", root / "lora"),
        missing=root / "missing",
        root=root,
    )


def _lora_adapter(base: Path, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():  # PEFT starts lora_B at zero: an adapter that changes nothing would prove nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return path


# ---- starting engines ------------------------------------------------------------------------------------------


def start(via: str, ckpt: Path, engine: dict | None = None, **model) -> LLM:
    """An LLM whose model settings arrive as the seed's variables (``via="env"``) or as ModelConfig fields."""
    tokenizer = model.pop("tokenizer", False)
    if via == "env":
        env = {**BASE_ENV, "CHECKPOINT_PATH": str(ckpt), **{ENV_OF[k]: str(v) for k, v in model.items()}}
        return LLM.from_env(env, skip_tokenizer_init=not tokenizer, **(engine or {}))
    config = ModelConfig(ckpt_path=str(ckpt), **{"weight_type": "FP32", **model})
    return LLM(config, skip_tokenizer_init=not tokenizer, **{"kv_cache_mem_mb": 4, **(engine or {})})


def env_llm(env: dict[str, str], ckpt: Path, **overrides) -> LLM:
    return LLM.from_env({**BASE_ENV, "CHECKPOINT_PATH": str(ckpt), **env}, skip_tokenizer_init=True, **overrides)


def generate(llm_factory: Callable[[], LLM], prompts=PROMPTS, config=GREEDY) -> tuple[list, dict]:
    with llm_factory() as llm:
        return llm.generate(prompts, config), llm.client.stats()


def tokens(outs) -> list[list[int]]:
    return [out.token_ids for out in outs]


@contextmanager
def refused(setting: str) -> Iterator[None]:
    """Start-up must fail with an rtp-mm error whose message names ``setting`` (any case: a field may be refused
    through its variable's name)."""
    with pytest.raises(RtpMmError) as info:
        yield
    assert setting.lower() in str(info.value).lower(), f"{setting!r} not named in: {info.value}"


@contextmanager
def logs(level: int = logging.INFO) -> Iterator[list[str]]:
    """Messages of rtp_mm's loggers from any thread (the engine logs on its own)."""
    messages: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("rtp_mm")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


# ---- model settings: variables and fields ----------------------------------------------------------------------


def probe_ckpt_path(kit: Kit, via: str) -> None:
    a, _ = generate(lambda: start(via, kit.llama_a))
    b, _ = generate(lambda: start(via, kit.llama_b))
    assert tokens(a) != tokens(b)
    with refused(ENV_OF["ckpt_path"] if via == "env" else "ckpt_path"):
        start(via, kit.missing)


def probe_tokenizer_path(kit: Kit, via: str) -> None:
    from transformers import AutoTokenizer

    text = "the lazy fox jumps over the quick dog"
    ids = {}
    for tok in (kit.tok_a, kit.tok_b):
        with start(via, kit.llama_a, tokenizer_path=tok, tokenizer=True) as llm:
            ids[tok] = llm.encode(text)
        assert ids[tok] == AutoTokenizer.from_pretrained(str(tok)).encode(text)
    assert ids[kit.tok_a] != ids[kit.tok_b]
    with refused(ENV_OF["tokenizer_path"] if via == "env" else "tokenizer_path"):
        start(via, kit.llama_a, tokenizer_path=kit.missing, tokenizer=True)


def probe_model_type(kit: Kit, via: str) -> None:
    prompt = random_prompts(512, [40], seed=3)  # long enough for the two rope rules to differ
    glm2, _ = generate(lambda: start(via, kit.glm2_rope, model_type="chatglm2", max_seq_len=256), prompt)
    glm3, _ = generate(lambda: start(via, kit.glm2_rope, model_type="chatglm3", max_seq_len=256), prompt)
    assert glm2[0].logprobs != glm3[0].logprobs
    with refused("model_type"):
        start(via, kit.glm2_rope, model_type="llama")  # not this checkpoint's family


def probe_max_seq_len(kit: Kit, via: str) -> None:
    config = GenerateConfig(max_new_tokens=20, top_k=1, ignore_eos=True)
    default, _ = generate(lambda: start(via, kit.llama_a), PROMPTS[:1], config)
    capped, _ = generate(lambda: start(via, kit.llama_a, max_seq_len=16), PROMPTS[:1], config)
    assert (len(default[0].token_ids), len(capped[0].token_ids)) == (20, 6)  # 10 prompt tokens + 6 = 16
    with refused("max_seq_len"):
        start(via, kit.llama_a, max_seq_len=-1)


def probe_weight_type(kit: Kit, via: str) -> None:
    with start(via, kit.llama_a, weight_type="FP32") as fp32, start(via, kit.llama_a, weight_type="INT8") as int8:
        assert "int8" in int8.weight_path and "int8" not in fp32.weight_path
        assert int8.generate(PROMPTS, GREEDY)[0].logprobs != fp32.generate(PROMPTS, GREEDY)[0].logprobs
    with refused("weight_type"):
        start(via, kit.llama_a, weight_type="INT4")


def probe_act_type(kit: Kit) -> None:
    _, fp32 = generate(lambda: start("field", kit.llama_a, act_type="FP32"))
    with start("field", kit.llama_a, act_type="BF16") as llm:
        assert llm.dtype == torch.bfloat16
        assert llm.client.stats()["num_blocks"] == 2 * fp32["num_blocks"]  # the KV cache is in the activation dtype
    with refused("act_type"):
        start("field", kit.llama_a, act_type="INT8")


def probe_seq_size_per_block(kit: Kit) -> None:
    _, small = generate(lambda: start("field", kit.llama_a, seq_size_per_block=4))
    _, large = generate(lambda: start("field", kit.llama_a, seq_size_per_block=16))
    assert (small["block_size"], large["block_size"], small["num_blocks"]) == (4, 16, 4 * large["num_blocks"])
    with refused("seq_size_per_block"):
        start("field", kit.llama_a, seq_size_per_block=0)


def probe_gen_num_per_circle(kit: Kit) -> None:
    lookup = {"speculative": SpeculativeConfig(sp_type="prompt_lookup")}
    prompt = [[5, 6, 7, 8, 9, 10, 11, 12] * 4]  # prompt lookup proposes the tokens that followed a repeated n-gram
    one, _ = generate(lambda: start("field", kit.llama_a, engine=lookup, gen_num_per_circle=1), prompt)
    four, _ = generate(lambda: start("field", kit.llama_a, engine=lookup, gen_num_per_circle=4), prompt)
    assert tokens(one) == tokens(four)  # greedy speculation is lossless
    assert four[0].aux_info["sp_proposed_len"] > one[0].aux_info["sp_proposed_len"]
    with refused("gen_num_per_circle"):
        start("field", kit.llama_a, gen_num_per_circle=3)  # without speculative decoding it could do nothing


def probe_ptuning_path(kit: Kit) -> None:
    glm2 = dict(model_type="chatglm2", max_seq_len=256)
    plain, _ = generate(lambda: start("field", kit.glm2, **glm2))
    prefixed, _ = generate(lambda: start("field", kit.glm2, **glm2, ptuning_path=kit.glm2_ptuning))
    assert [out.aux_info["prefix_len"] for out in plain + prefixed] == [0] * 3 + [5] * 3
    assert [out.logprobs for out in plain] != [out.logprobs for out in prefixed]
    with refused("ptuning_path"):
        start("field", kit.llama_a, ptuning_path=kit.glm2_ptuning)  # Llama gives a prefix no meaning


def probe_lora_infos(kit: Kit) -> None:
    base, _ = generate(lambda: start("field", kit.llama_a))
    merged, _ = generate(lambda: start("field", kit.llama_a, lora_infos={"a": kit.lora}))
    assert tokens(base) != tokens(merged)  # one adapter is merged into the weights: every request gets it
    with refused("lora_infos"):
        start("field", kit.llama_a, lora_infos={"a": kit.missing})


# ---- engine and server variables -------------------------------------------------------------------------------


def probe_concurrency_limit(kit: Kit) -> None:
    _, batched = generate(lambda: env_llm({"CONCURRENCY_LIMIT": "32"}, kit.llama_a))
    _, one_by_one = generate(lambda: env_llm({"CONCURRENCY_LIMIT": "1"}, kit.llama_a))
    assert (batched["step_count"], one_by_one["step_count"]) == (8, 24)  # 3 requests x 8 tokens
    with refused("CONCURRENCY_LIMIT"):
        env_llm({"CONCURRENCY_LIMIT": "0"}, kit.llama_a)


def probe_int8_kv_cache(kit: Kit) -> None:
    fp32, fp32_stats = generate(lambda: env_llm({"INT8_KV_CACHE": "0"}, kit.llama_a))
    int8, int8_stats = generate(lambda: env_llm({"INT8_KV_CACHE": "1"}, kit.llama_a))
    # A head of 16 fp32 values (64 bytes) becomes 16 int8 values and a float32 scale (20 bytes).
    assert int8_stats["num_blocks"] == 64 * fp32_stats["num_blocks"] // 20
    assert [out.logprobs for out in fp32] != [out.logprobs for out in int8]
    with refused("INT8_KV_CACHE"):
        env_llm({"INT8_KV_CACHE": "maybe"}, kit.llama_a)


def probe_kv_cache_mem_mb(kit: Kit) -> None:
    _, two = generate(lambda: env_llm({"KV_CACHE_MEM_MB": "2"}, kit.llama_a))
    _, four = generate(lambda: env_llm({"KV_CACHE_MEM_MB": "4"}, kit.llama_a))
    assert 2 * two["num_blocks"] == four["num_blocks"] > 0
    with refused("KV_CACHE_MEM_MB"):
        env_llm({"KV_CACHE_MEM_MB": "lots"}, kit.llama_a)


def probe_pre_allocate_op_mem(kit: Kit) -> None:
    for value, warmed in (("1", True), ("0", False)):
        with logs() as messages:
            env_llm({"PRE_ALLOCATE_OP_MEM": value}, kit.llama_a).shutdown()
        assert any(m.startswith("warm-up forward") for m in messages) is warmed
    with refused("PRE_ALLOCATE_OP_MEM"):
        env_llm({"PRE_ALLOCATE_OP_MEM": "2"}, kit.llama_a)


def probe_reuse_cache(kit: Kit) -> None:
    prompt = random_prompts(320, [20], seed=5)
    for value, reuse_len in (("1", 16), ("0", 0)):  # two full blocks of 8 found again, the rest recomputed
        with env_llm({"REUSE_CACHE": value}, kit.llama_a) as llm:
            llm.generate(prompt, GREEDY)
            assert llm.generate(prompt, GREEDY)[0].aux_info["reuse_len"] == reuse_len
    with refused("REUSE_CACHE"):
        env_llm({"REUSE_CACHE": "sometimes"}, kit.llama_a)


def probe_tp_split_emb_and_lmhead(kit: Kit) -> None:
    """Under TP_SIZE=2 the embedding and head are vocab-split (each rank holds half) or replicated: the same tokens,
    different per-rank weight bytes; a bad value is refused by name."""
    results, per_rank = [], []
    for value in ("1", "0"):
        with env_llm({"TP_SIZE": "2", "TP_SPLIT_EMB_AND_LMHEAD": value}, kit.llama_a) as llm:
            results.append(llm.generate(PROMPTS, GREEDY))
            per_rank.append(llm.client.info.rank_weight_bytes)
    assert tokens(results[0]) == tokens(results[1])
    table = TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"] * 4  # fp32 rows; the head is untied: two tables
    assert per_rank[1][0] - per_rank[0][0] == table, per_rank  # split: each rank holds half of each table
    with refused("TP_SPLIT_EMB_AND_LMHEAD"):
        env_llm({"TP_SPLIT_EMB_AND_LMHEAD": "maybe"}, kit.llama_a)


def probe_ft_disable_custom_ar(kit: Kit) -> None:
    """Exactly 1 disables the custom all-reduce, any other value leaves it on (2 starts): the start-up line says which
    (CPU ranks run gloo's all-reduce either way)."""
    for value, said in (("1", "FT_DISABLE_CUSTOM_AR=1"), ("2", "custom all-reduce on")):
        with logs(logging.WARNING) as messages, env_llm({"TP_SIZE": "2", "FT_DISABLE_CUSTOM_AR": value}, kit.llama_a):
            pass
        assert any("all-reduce" in m and said in m for m in messages), messages


def probe_extra_data_path(kit: Kit) -> None:
    """llava's CLIP tower comes from EXTRA_DATA_PATH: another tower encodes differently, and without it a checkpoint
    naming a hub tower is refused; a text model warns that it has no use for it."""
    proc, rows, picture = processor("llava", pad=True), [], image(SIZES[0], 0)
    towers = [save_llava(tiny_llava("llava", seed=s), proc, kit.root / f"llava{s}", "original") for s in (5, 6)]
    llava = {"MODEL_TYPE": "llava"}
    for _, tower in towers:
        with env_llm({**llava, "EXTRA_DATA_PATH": tower}, towers[0][0]) as llm:
            rows.append(llm.vision.encode([llm.vision.preprocess(picture)])[0])
    assert rows[0].shape == rows[1].shape and not torch.allclose(rows[0], rows[1])
    with refused("EXTRA_DATA_PATH"):
        env_llm(llava, towers[0][0])  # its config names a hub tower, which is not a local folder
    with logs(logging.WARNING) as messages:
        env_llm({"EXTRA_DATA_PATH": str(kit.root)}, kit.llama_a).shutdown()
    assert any("EXTRA_DATA_PATH has no effect" in m for m in messages)


def probe_vit_trt(kit: Kit) -> None:
    with logs(logging.WARNING) as messages:
        with env_llm({"VIT_TRT": "1"}, kit.llama_a) as llm:
            assert llm.engine_config.vision_backend == "tensorrt"
    assert any(m.startswith("VIT_TRT=1 has no effect") for m in messages)
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # this machine cannot build engines: a vision model refuses to start rather than fall back
        path, extra = save_llava(tiny_llava("llava"), processor("llava"), kit.root / "llava_trt", "original")
        with refused("VIT_TRT"):
            env_llm({"MODEL_TYPE": "llava", "VIT_TRT": "1", "EXTRA_DATA_PATH": extra}, path)
    with refused("VIT_TRT"):
        env_llm({"VIT_TRT": "yes please"}, kit.llama_a)


def server_log(env: dict[str, str], timeout: float = 120.0) -> tuple[int | None, str]:
    """(exit code or None, stderr) of ``python -m rtp_mm.start_server`` until it announces it is serving."""
    # Nothing of this process's environment that rtp-mm reads (every quoted variable name of its parser's modules).
    sources = "".join(Path(m.__file__).read_text() for m in (rtp_mm.config, rtp_mm.speculative_config))
    read = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', sources))
    clean = {k: v for k, v in os.environ.items() if k not in read | ALL_VARIABLES}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtp_mm.start_server"],
        env={**clean, "START_PORT": "0", "HOST": "127.0.0.1", **env},
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines, code = [], None
    try:
        for line in proc.stderr:
            lines.append(line)
            if "rtp-mm serving" in line:
                proc.terminate()
                break
        else:  # stderr closed: it stopped by itself
            code = proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    return code, "".join(lines)


def probe_log_level(kit: Kit) -> None:
    env = {**BASE_ENV, "CHECKPOINT_PATH": str(kit.llama_a), "TOKENIZER_PATH": str(kit.tok_a)}
    with ThreadPoolExecutor(3) as pool:  # three servers at once: each spends seconds importing
        quiet, info, bad = pool.map(server_log, [env, {**env, "LOG_LEVEL": "INFO"}, {**env, "LOG_LEVEL": "chatty"}])
    assert "rtp-mm serving" in quiet[1] and "rtp-mm serving" in info[1], (quiet, info)
    assert "engine ready" not in quiet[1] and "engine ready" in info[1]  # the default is WARNING
    assert bad[0] == 2 and "LOG_LEVEL='chatty'" in bad[1], bad


def probe_load_ckpt_num_process(kit: Kit) -> None:
    assert len(list(kit.llama_a.glob("*.safetensors"))) > 2
    outs = {}
    for value in ("1", "2"):
        with logs() as messages, env_llm({"LOAD_CKPT_NUM_PROCESS": value}, kit.llama_a) as llm:
            outs[value] = [out.logprobs for out in llm.generate(PROMPTS, GREEDY)]
        assert any(m.startswith("loaded llama") and m.endswith(f", {value} processes") for m in messages), messages
    assert outs["1"] == outs["2"]  # the weights are bit-identical whichever way they were read
    with refused("LOAD_CKPT_NUM_PROCESS"):
        env_llm({"LOAD_CKPT_NUM_PROCESS": "-1"}, kit.llama_a)


PROBES: dict[str, Callable[..., None]] = {
    "CHECKPOINT_PATH": partial(probe_ckpt_path, via="env"),
    "ckpt_path": partial(probe_ckpt_path, via="field"),
    "TOKENIZER_PATH": partial(probe_tokenizer_path, via="env"),
    "tokenizer_path": partial(probe_tokenizer_path, via="field"),
    "MODEL_TYPE": partial(probe_model_type, via="env"),
    "model_type": partial(probe_model_type, via="field"),
    "MAX_SEQ_LEN": partial(probe_max_seq_len, via="env"),
    "max_seq_len": partial(probe_max_seq_len, via="field"),
    "WEIGHT_TYPE": partial(probe_weight_type, via="env"),
    "weight_type": partial(probe_weight_type, via="field"),
    "act_type": probe_act_type,
    "seq_size_per_block": probe_seq_size_per_block,
    "gen_num_per_circle": probe_gen_num_per_circle,
    "ptuning_path": probe_ptuning_path,
    "lora_infos": probe_lora_infos,
    "CONCURRENCY_LIMIT": probe_concurrency_limit,
    "INT8_KV_CACHE": probe_int8_kv_cache,
    "KV_CACHE_MEM_MB": probe_kv_cache_mem_mb,
    "PRE_ALLOCATE_OP_MEM": probe_pre_allocate_op_mem,
    "TP_SPLIT_EMB_AND_LMHEAD": probe_tp_split_emb_and_lmhead,
    "REUSE_CACHE": probe_reuse_cache,
    "EXTRA_DATA_PATH": probe_extra_data_path,
    "VIT_TRT": probe_vit_trt,
    "FT_DISABLE_CUSTOM_AR": probe_ft_disable_custom_ar,
    "LOG_LEVEL": probe_log_level,
    "LOAD_CKPT_NUM_PROCESS": probe_load_ckpt_num_process,
}
ALL_VARIABLES = {name for name in PROBES if name.isupper()}


def test_every_seed_setting_has_a_probe():
    variables, fields = seed_settings()
    # The parser must see the seed as it is: both tables, and the notes' variables.
    assert {"TOKENIZER_PATH", "FT_DISABLE_CUSTOM_AR", "LOG_LEVEL", "LOAD_CKPT_NUM_PROCESS"} <= variables
    assert {"model_type", "lora_infos"} <= fields
    missing = sorted((variables | fields) - PROBES.keys())
    assert not missing, f"seed settings without a probe in {__file__}: {missing}"
    assert not PROBES.keys() - (variables | fields), "a probe for a name the seed does not list"
    assert WAITING.keys() <= PROBES.keys() and all(len(reason) > 40 for reason in WAITING.values())


@pytest.mark.parametrize("name", sorted(PROBES))
def test_seed_setting(name, kit):
    PROBES[name](kit)
