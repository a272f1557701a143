"""P-tuning v2 (PTUNING_PATH) through the real engine.

Oracle: a tiny ChatGLM2 (transformers' GlmForCausalLM written in ChatGLM2's original checkpoint layout) fed, as past
key values, the prefix K/V that the original ``ChatGLMModel.get_prompt`` computes from the same random prefix encoder
(written here from the original code: embedding, optional tanh MLP, ``view(P, L*2, G, D)``, ``permute``, ``split(2)``),
with ChatGLM2's positions (the prompt starts at 0 after the prefix). ChatGLM-6B v1 is checked against the independent
GLM v1 reference given the same prefix keys.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import CheckpointError, ConfigError
from rtp_mm_testing.engine_probe import prompt_logits
from rtp_mm_testing.glm_oracle import (
    chatglm2_config,
    glm_to_chatglm2_state,
    glm_v1_reference_logits,
    read_bin_checkpoint,
    reference_greedy,
    save_sharded,
    tiny_glm,
)
from rtp_mm_testing.oracle import random_prompts, tiny_llama
from rtp_mm_testing.shared import GOLDEN

VOCAB = 320
GREEDY = GenerateConfig(max_new_tokens=12, top_k=1, logprobs=5, ignore_eos=True)


def prefix_encoder(pre_seq_len: int, kv_size: int, hidden: int, projection: bool, seed: int) -> dict:
    """Random weights of the original PrefixEncoder (ChatGLM2: the MLP maps kv_size -> hidden -> kv_size)."""
    g = torch.Generator().manual_seed(seed)
    weights = {"transformer.prefix_encoder.embedding.weight": torch.randn(pre_seq_len, kv_size, generator=g)}
    if projection:
        for name, shape in (("trans.0", (hidden, kv_size)), ("trans.2", (kv_size, hidden))):
            weights[f"transformer.prefix_encoder.{name}.weight"] = torch.randn(*shape, generator=g) * 0.2
            weights[f"transformer.prefix_encoder.{name}.bias"] = torch.randn(shape[0], generator=g) * 0.2
    return weights


def original_prompt(weights: dict, num_layers: int, groups: int, head_dim: int) -> list[tuple[torch.Tensor, ...]]:
    """ChatGLM2's ``get_prompt`` for batch size 1: per layer (K, V), each [pre_seq_len, 1, groups, head_dim]."""
    w = {k.removeprefix("transformer.prefix_encoder."): v for k, v in weights.items()}
    prefix_tokens = torch.arange(w["embedding.weight"].shape[0])[None]
    past = torch.nn.functional.embedding(prefix_tokens, w["embedding.weight"])
    if "trans.0.weight" in w:
        hidden = torch.tanh(torch.nn.functional.linear(past, w["trans.0.weight"], w["trans.0.bias"]))
        past = torch.nn.functional.linear(hidden, w["trans.2.weight"], w["trans.2.bias"])
    past = past.view(1, past.shape[1], num_layers * 2, groups, head_dim)
    return [tuple(kv.unbind(0)) for kv in past.permute([2, 1, 0, 3, 4]).split(2)]


class Oracle:
    """The HF model fed the prefix as past key values, positions from 0."""

    def __init__(self, model, prompt_kv: list[tuple[torch.Tensor, ...]]):
        self.model, self.prompt_kv = model, prompt_kv
        self.pre_seq_len = prompt_kv[0][0].shape[0]

    def _cache(self):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(self.prompt_kv):  # [P, 1, G, D] -> HF's [1, G, P, D]
            cache.update(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), layer)
        return cache

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        out = self.model(
            torch.tensor([ids]),
            position_ids=torch.arange(n)[None],
            attention_mask=torch.ones(1, self.pre_seq_len + n, dtype=torch.long),
            past_key_values=self._cache(),
        )
        return out.logits[0].float()

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
        return reference_greedy(self.logits, prompt, steps)


def chatglm2_with_prefix(tmp_path, pre_seq_len: int, projection: bool, where: str = "explicit", seed: int = 3):
    """(checkpoint folder, PTUNING_PATH to set or None, oracle)."""
    model = tiny_glm(vocab_size=VOCAB)
    cfg = model.config
    ckpt = tmp_path / "chatglm2"
    save_sharded(glm_to_chatglm2_state(model), ckpt, "safetensors")
    (ckpt / "config.json").write_text(json.dumps(chatglm2_config(cfg, 8192)))
    kv_size = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    weights = prefix_encoder(pre_seq_len, kv_size, cfg.hidden_size, projection, seed)
    folder = {"explicit": tmp_path / "my_ptuning", "auto": ckpt / "ptuning"}[where]
    folder.mkdir()
    # What ChatGLM2's ptuning/main.py leaves: the full config with the prefix fields, and only the prefix tensors.
    ptuning_config = chatglm2_config(cfg, 8192, pre_seq_len=pre_seq_len, prefix_projection=projection)
    (folder / "config.json").write_text(json.dumps(ptuning_config))
    torch.save(weights, folder / "pytorch_model.bin")
    oracle = Oracle(model, original_prompt(weights, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim))
    return ckpt, (str(folder) if where == "explicit" else None), oracle


def glm2_llm(ckpt, ptuning_path, block: int = 8, **engine) -> LLM:
    config = ModelConfig(
        model_type="chatglm2",
        ckpt_path=str(ckpt),
        ptuning_path=ptuning_path,
        max_seq_len=256,
        weight_type="FP32",
        seq_size_per_block=block,
    )
    return LLM(config, kv_cache_mem_mb=engine.pop("kv_cache_mem_mb", 4), skip_tokenizer_init=True, **engine)


def small_glm(ckpt, **model) -> LLM:
    config = ModelConfig(
        model_type=model.pop("model_type", "chatglm2"), ckpt_path=str(ckpt), weight_type="FP32", **model
    )
    return LLM(config, kv_cache_mem_mb=4, skip_tokenizer_init=True)


def check_against(llm: LLM, oracle: Oracle, prompts: list[list[int]], atol: float = 1e-4) -> list:
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, ref = oracle.greedy(prompt, GREEDY.max_new_tokens)
        assert out.token_ids == tokens, (prompt[:4], out.token_ids, tokens)
        for step, entry in enumerate(out.logprobs):
            for token, lp in entry.items():
                assert abs(lp - float(ref[step, token])) < atol, (step, token, lp, float(ref[step, token]))
        assert out.aux_info["prefix_len"] == oracle.pre_seq_len
    return outs


@pytest.mark.parametrize(
    "pre_seq_len,projection,where,block",
    [
        (5, False, "explicit", 8),  # the prefix half-fills its block: 3 masked pad positions in front of it
        (16, True, "auto", 8),  # prefix_projection's MLP; <ckpt>/ptuning found without PTUNING_PATH; 2 whole blocks
        (11, True, "explicit", 4),  # 3 blocks, 1 pad position
    ],
)
def test_chatglm2_prefix_equals_hf_fed_the_same_past_key_values(tmp_path, pre_seq_len, projection, where, block):
    ckpt, ptuning_path, oracle = chatglm2_with_prefix(tmp_path, pre_seq_len, projection, where)
    prompts = random_prompts(VOCAB, [1, 6, 9, 17, 30], seed=pre_seq_len)
    with glm2_llm(ckpt, ptuning_path, block=block) as llm:
        assert llm.model_config.ptuning_path == str(ptuning_path or ckpt / "ptuning")
        logits = prompt_logits(llm, prompts[3])  # every prompt row of one prefill
        assert (logits - oracle.logits(prompts[3])).abs().max() < 1e-4
        check_against(llm, oracle, prompts[2:3])  # one sequence: the unmasked decode path
        check_against(llm, oracle, prompts)  # a batch: masked decodes of different lengths
        stats = llm.client.stats()
    reserved = -(-pre_seq_len // block)
    bytes_per_block = 2 * 2 * block * 2 * 16 * 4  # K and V x layers x tokens x kv heads x head_dim x fp32
    assert stats["num_blocks"] == 4 * 2**20 // bytes_per_block - reserved  # the prefix blocks are not the scheduler's


def test_prefix_changes_the_output(tmp_path):
    """The prefix is not a no-op: the same checkpoint without it answers differently (and reports prefix_len 0)."""
    ckpt, ptuning_path, oracle = chatglm2_with_prefix(tmp_path, 6, False)
    prompt = random_prompts(VOCAB, [12], seed=1)
    with glm2_llm(ckpt, ptuning_path) as llm:
        (with_prefix,) = llm.generate(prompt, GREEDY)
    with glm2_llm(ckpt, None) as llm:
        (without,) = llm.generate(prompt, GREEDY)
    assert with_prefix.aux_info["prefix_len"] == 6 and without.aux_info["prefix_len"] == 0
    assert with_prefix.logprobs != without.logprobs


def test_prefix_with_chunked_prefill_prefix_cache_and_preemption(tmp_path):
    """Chunks after the first, prefix-cache hits and recomputation after preemption all see the same prefix keys."""
    ckpt, ptuning_path, oracle = chatglm2_with_prefix(tmp_path, 7, True)
    prompts = random_prompts(VOCAB, [40, 33, 26], seed=9)
    shared = prompts[0][:24]
    prompts += [shared + [5, 6, 7], shared + [9]]  # full cached blocks of prompts[0], then their own tail
    # 14 blocks of 8 tokens: one 7-token prefix block, 13 for five sequences of up to 52 tokens -> preemptions.
    config = ModelConfig("chatglm2", str(ckpt), ptuning_path=ptuning_path, max_seq_len=60, weight_type="FP32")
    engine = dict(max_num_batched_tokens=16, reuse_cache=True, kv_cache_blocks=14)
    with LLM(config, skip_tokenizer_init=True, **engine) as llm:
        check_against(llm, oracle, prompts[:1])
        outs = check_against(llm, oracle, prompts)
        stats = llm.client.stats()
    assert stats["num_blocks"] == 13
    assert max(out.aux_info["reuse_len"] for out in outs) >= 24
    assert stats["num_preemptions"] > 0


def test_int8_kv_cache_holds_the_prefix_too(tmp_path):
    """INT8_KV_CACHE quantizes the prefix blocks like any other: close to the fp32 oracle, not equal."""
    ckpt, ptuning_path, oracle = chatglm2_with_prefix(tmp_path, 5, False)
    prompt = random_prompts(VOCAB, [14], seed=2)[0]
    with glm2_llm(ckpt, ptuning_path, int8_kv_cache=True) as llm:
        (out,) = llm.generate([prompt], GenerateConfig(max_new_tokens=1, top_k=1, logprobs=5))
    ref = torch.log_softmax(oracle.logits(prompt)[-1], -1)
    assert out.token_ids == [int(ref.argmax())]
    assert all(abs(lp - float(ref[t])) < 0.05 for t, lp in out.logprobs[0].items())


def test_chatglm_v1_prefix_against_the_glm_reference(tmp_path):
    """ChatGLM-6B: the prefix keys are visible to every query, the bidirectional context and 2D positions unchanged."""
    ckpt = tmp_path / "chatglm_v1"
    shutil.copytree(GOLDEN / "chatglm_v1" / "checkpoint", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    state = read_bin_checkpoint(ckpt)
    layers, hidden, heads = config["num_layers"], config["hidden_size"], config["num_attention_heads"]
    # ChatGLM-6B's PrefixEncoder with prefix_projection: hidden -> hidden -> num_layers * 2 * hidden.
    g = torch.Generator().manual_seed(4)
    weights = {
        "transformer.prefix_encoder.embedding.weight": torch.randn(6, hidden, generator=g),
        "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, hidden, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.2.weight": torch.randn(layers * 2 * hidden, hidden, generator=g) * 0.3,
        "transformer.prefix_encoder.trans.2.bias": torch.randn(layers * 2 * hidden, generator=g) * 0.2,
    }
    (ckpt / "ptuning").mkdir()
    torch.save(weights, ckpt / "ptuning" / "pytorch_model.bin")
    prompt_kv = original_prompt(weights, layers, heads, hidden // heads)
    prefix = [(k[:, 0], v[:, 0]) for k, v in prompt_kv]  # [P, H, D] per layer
    ids = [11, 45, 200, 501, 504, 31, 77]  # context, [gMASK], <sop>, generated part (chatglm_v1 golden's ids)
    # ChatGLM-6B's GLMBlock keeps its default of 28 layers for alpha.
    glm = dict(heads=heads, sop=504, mask_priority=(501, 500), gmask=501, two_d=True, geglu=False, alpha=56**0.5)
    reference = glm_v1_reference_logits(state, ids, **glm, prefix=prefix)
    without = glm_v1_reference_logits(state, ids, **glm)
    assert (reference - without).abs().max() > 0.1  # the prefix matters to the reference as well
    with small_glm(ckpt, model_type="chatglm", max_seq_len=64) as llm:
        logits = prompt_logits(llm, ids)
        (out,) = llm.generate([ids[:5]], GenerateConfig(max_new_tokens=1, top_k=1))
    assert (logits - reference).abs().max() < 1e-3 * max(1.0, float(reference.abs().max()))
    assert out.aux_info["prefix_len"] == 6


def test_a_prefix_encoder_saved_in_the_checkpoint(tmp_path):
    """A checkpoint whose config.json sets pre_seq_len carries its own prefix encoder: the decoder skips it and the
    engine serves it exactly as the same encoder given through PTUNING_PATH (checked against the oracle above)."""
    from safetensors.torch import load_file, save_file

    golden = GOLDEN / "chatglm2" / "checkpoint"
    ckpt = tmp_path / "merged"
    shutil.copytree(golden, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "pre_seq_len": 3, "prefix_projection": False}))
    groups, head_dim, layers = config["multi_query_group_num"], config["kv_channels"], config["num_layers"]
    weights = prefix_encoder(3, layers * 2 * groups * head_dim, config["hidden_size"], False, seed=8)
    save_file({**load_file(str(golden / "model.safetensors")), **weights}, str(ckpt / "model.safetensors"))
    (tmp_path / "ptuning").mkdir()
    torch.save(weights, tmp_path / "ptuning" / "pytorch_model.bin")
    ids = random_prompts(512, [9], seed=5)[0]
    with small_glm(ckpt, max_seq_len=64) as llm:
        assert llm.model_config.ptuning_path == str(ckpt)
        logits = prompt_logits(llm, ids)
        (out,) = llm.generate([ids], GenerateConfig(max_new_tokens=1))
    with small_glm(golden, max_seq_len=64, ptuning_path=str(tmp_path / "ptuning")) as llm:
        separate = prompt_logits(llm, ids)
    with small_glm(golden, max_seq_len=64) as llm:
        plain = prompt_logits(llm, ids)
    assert out.aux_info["prefix_len"] == 3
    assert torch.equal(logits, separate) and (logits - plain).abs().max() > 0.1
    save_file(load_file(str(golden / "model.safetensors")), str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="transformer.prefix_encoder.embedding.weight"):
        small_glm(ckpt, max_seq_len=64)  # pre_seq_len without the encoder's tensors


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_other_families_refuse_a_prefix_at_start_up(tmp_path, caplog):
    ckpt = tmp_path / "llama"
    tiny_llama(ckpt)
    ptuning = tmp_path / "ptuning"
    ptuning.mkdir()
    with pytest.raises(ConfigError) as info:
        LLM(ModelConfig(ckpt_path=str(ckpt), ptuning_path=str(ptuning)), skip_tokenizer_init=True)
    message = str(info.value)
    assert "PTUNING_PATH" in message and "llama" in message and "chatglm2" in message
    (ckpt / "ptuning").mkdir()  # what RTP-LLM would pick up by itself: refused as well, saying where it was found
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError, match="ptuning/ in CHECKPOINT_PATH"):
        LLM(ModelConfig(ckpt_path=str(ckpt)), skip_tokenizer_init=True)
    assert "loaded" not in caplog.text  # refused before any weight was read


def test_a_prefix_that_does_not_fit_the_model_is_refused(tmp_path):
    ckpt, ptuning_path, _ = chatglm2_with_prefix(tmp_path, 4, False)
    bad = {"transformer.prefix_encoder.embedding.weight": torch.randn(4, 96)}
    torch.save(bad, tmp_path / "my_ptuning" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="needs 128 = num_layers 2 x 2 x kv_heads 2 x head_dim 16"):
        glm2_llm(ckpt, ptuning_path)
    good = {"transformer.prefix_encoder.embedding.weight": torch.randn(4, 128)}
    torch.save(good, tmp_path / "my_ptuning" / "pytorch_model.bin")
    cfg = json.loads((tmp_path / "my_ptuning" / "config.json").read_text())
    (tmp_path / "my_ptuning" / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": 9}))
    with pytest.raises(CheckpointError, match="pre_seq_len=9"):
        glm2_llm(ckpt, ptuning_path)


def test_a_prefix_larger_than_the_cache_is_refused(tmp_path):
    ckpt, ptuning_path, _ = chatglm2_with_prefix(tmp_path, 20, False)
    config = ModelConfig("chatglm2", str(ckpt), ptuning_path=ptuning_path, max_seq_len=64, weight_type="FP32")
    with pytest.raises(ConfigError, match="P-tuning prefix .* takes 3 of the 10 KV blocks"):
        LLM(config, kv_cache_blocks=10, skip_tokenizer_init=True)


def test_speculative_verification_sees_the_prefix(tmp_path):
    """Prompt-lookup proposals are verified by a multi-token forward of the target: the prefix is in front of it too."""
    from rtp_mm.speculative_config import SpeculativeConfig

    ckpt, ptuning_path, oracle = chatglm2_with_prefix(tmp_path, 5, False)
    prompts = [[7, 8, 9, 10, 11, 12] * 5, random_prompts(VOCAB, [20], seed=4)[0] * 2]
    config = ModelConfig(
        "chatglm2", str(ckpt), ptuning_path=ptuning_path, max_seq_len=128, weight_type="FP32", gen_num_per_circle=4
    )
    lookup = SpeculativeConfig(sp_type="prompt_lookup")
    with LLM(config, kv_cache_mem_mb=4, speculative=lookup, skip_tokenizer_init=True) as llm:
        outs = check_against(llm, oracle, prompts)
    assert sum(out.aux_info["sp_proposed_len"] for out in outs) > 0
