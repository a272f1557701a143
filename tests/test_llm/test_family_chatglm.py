"""GLM families through the real engine: ChatGLM-6B / ChatGLM2 / ChatGLM3 golden data (outputs of the original
implementations), ChatGLM2/3 against transformers' GlmForCausalLM written in the original checkpoint layout, GLM-130B
against an independent reference (itself checked against the ChatGLM-6B golden data), and the engine's handling of
prefix-LM prompts (one-chunk prefill, prefix caching, positions, bad input)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import InvalidRequest, PromptTooLongError
from rtp_mm.llm.models.prefix_lm import PrefixLM
from rtp_mm.llm.models.prompt_layout import PromptLayout
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
from rtp_mm_testing.oracle import check_parity, random_prompts, tiny_llm
from rtp_mm_testing.shared import GOLDEN

GREEDY = GenerateConfig(max_new_tokens=8, top_k=1, ignore_eos=True, logprobs=20)
V1_IDS = dict(sop=504, mask=500, gmask=501)  # chatglm_v1 golden's remapped special ids


def glm_llm(path, model_type: str, max_seq_len: int, block: int = 8, **engine) -> LLM:
    """tiny_llm with a chosen KV block size (a ModelConfig field)."""
    config = ModelConfig(
        model_type=model_type,
        ckpt_path=str(path),
        max_seq_len=max_seq_len,
        weight_type="FP32",
        seq_size_per_block=block,
    )
    return LLM(config, kv_cache_mem_mb=engine.pop("kv_cache_mem_mb", 16), skip_tokenizer_init=True, **engine)


def _golden(case: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    folder = GOLDEN / case
    return json.loads((folder / "inputs.json").read_text()), load_file(str(folder / "expected.safetensors"))


def _tol(expected: torch.Tensor) -> float:
    """The golden README's tolerance: 1e-4 * max(1, max |expected|)."""
    return 1e-4 * max(1.0, float(expected.abs().max()))


def check_steps(out, expected_logits: torch.Tensor) -> None:
    """Every returned logprob of every greedy step within tolerance of log_softmax(expected step logits)."""
    ref = torch.log_softmax(expected_logits, -1)
    tol = _tol(expected_logits)
    for step, entry in enumerate(out.logprobs):
        for token, lp in entry.items():
            assert abs(lp - float(ref[step, token])) <= tol, (step, token, lp, float(ref[step, token]))


# ---- golden data -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,model_type",
    [
        ("chatglm_v1", "chatglm"),
        ("chatglm_v1", "chat_glm"),
        ("chatglm2", "chatglm2"),
        ("chatglm2", "chat_glm_2"),
        ("chatglm3", "chatglm3"),
        ("chatglm3", "chat_glm_3"),
    ],
)
def test_golden(case, model_type):
    inputs, expected = _golden(case)
    with tiny_llm(GOLDEN / case / "checkpoint", model_type, max_seq_len=256) as llm:
        for inp in inputs:
            name, ids = inp["name"], inp["input_ids"]
            logits = prompt_logits(llm, ids)
            want = expected[f"logits_{name}"]
            assert (logits - want).abs().max() <= _tol(want), name
        # Each prompt alone, then all of them in one concurrent batch.
        for inp in inputs:
            (out,) = llm.generate([inp["input_ids"]], GREEDY)
            assert out.token_ids == expected[f"greedy_{inp['name']}"].tolist(), inp["name"]
            check_steps(out, expected[f"greedy_logits_{inp['name']}"])
        outs = llm.generate([inp["input_ids"] for inp in inputs], GREEDY)
        for inp, out in zip(inputs, outs, strict=True):
            assert out.token_ids == expected[f"greedy_{inp['name']}"].tolist(), inp["name"]
            check_steps(out, expected[f"greedy_logits_{inp['name']}"])


def test_chatglm_v1_positions_follow_the_original():
    """The README's rule: context token t -> (t, 0); <sop> and the k-th generated token -> (mask index, 1 + k)."""
    glm = PrefixLM(sop_id=9, mask_ids=(8, 7), gmask_id=8, two_d=True)  # [gMASK] 8 preferred over [MASK] 7
    prompt = [1, 2, 7, 3, 8, 9]  # [MASK] at 2, [gMASK] at 4, <sop> at 5
    layout = glm.prompt_layout(prompt)
    assert layout.positions_of(0, 9, 6) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3), (4, 4)]
    assert layout.positions_of(7, 8, 6) == [(4, 3)]  # a decode step alone
    assert layout.bidirectional_len == 5
    one_d = PrefixLM(sop_id=9, mask_ids=(7, 8), gmask_id=8, two_d=False)  # GLM-130B: [MASK] first, 1D
    assert one_d.prompt_layout(prompt).positions_of(3, 8, 6) == [3, 4, 2, 2, 2]  # from <sop> on: the [MASK] index
    gmask = one_d.prompt_layout([1, 8, 9])
    assert gmask.positions_of(0, 5, 3) == [0, 1, 2, 3, 4] and gmask.bidirectional_len == 2  # [gMASK]: plain


def test_chatglm_v1_bad_prompts_are_refused():
    with tiny_llm(GOLDEN / "chatglm_v1" / "checkpoint", "chatglm", max_seq_len=64) as llm:
        with pytest.raises(InvalidRequest, match="<sop>"):
            llm.generate([[10, 11, 501]], GREEDY)  # no <sop>
        with pytest.raises(InvalidRequest, match=r"\[gMASK\]/\[MASK\]"):
            llm.generate([[10, 11, 504]], GREEDY)  # <sop> but no mask token before it


def test_chatglm_v1_prompt_is_prefilled_in_one_chunk():
    """With a step budget smaller than the prompts, a prefix-LM prompt waits for a step with room for all of it
    instead of being chunked (chunks would see only part of the bidirectional context); results stay exact, and a
    prompt longer than the whole budget is refused up front."""
    inputs, expected = _golden("chatglm_v1")
    short, long = inputs[0]["input_ids"], inputs[1]["input_ids"]  # 7 and 58 tokens
    ckpt = GOLDEN / "chatglm_v1" / "checkpoint"
    with tiny_llm(ckpt, "chatglm", max_seq_len=128, max_num_batched_tokens=60) as llm:
        outs = llm.generate([short, long, short, inputs[2]["input_ids"]], GREEDY)
        names = ["short", "long", "short", "mask_infill"]
        for name, out in zip(names, outs, strict=True):
            assert out.token_ids == expected[f"greedy_{name}"].tolist(), name
            check_steps(out, expected[f"greedy_logits_{name}"])
    with tiny_llm(ckpt, "chatglm", max_seq_len=128, max_num_batched_tokens=32) as llm:
        with pytest.raises(PromptTooLongError, match="MAX_NUM_BATCHED_TOKENS"):
            llm.generate([long], GREEDY)


def test_chatglm_v1_preemption_recomputes_exactly():
    """A cache too small for all requests forces preemption; recomputation (prompt plus generated tokens in one
    chunk, bidirectional over the prompt context) gives the golden results."""
    inputs, expected = _golden("chatglm_v1")
    prompts = [inp["input_ids"] for inp in inputs] * 2
    names = [inp["name"] for inp in inputs] * 2
    ckpt = GOLDEN / "chatglm_v1" / "checkpoint"
    with glm_llm(ckpt, "chatglm", 72, block=16, kv_cache_blocks=6) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert llm.stats()["num_preemptions"] > 0
    for name, out in zip(names, outs, strict=True):
        assert out.token_ids == expected[f"greedy_{name}"].tolist(), name


def test_chatglm_v1_prefix_cache_never_shares_across_contexts():
    """REUSE_CACHE with 4-token blocks: a prompt whose first blocks equal another's but whose later context differs
    must not reuse them (its early K/V see the later tokens); an identical prompt does reuse them. Both match a
    cache-free reference."""
    inputs, expected = _golden("chatglm_v1")
    long = inputs[1]["input_ids"]
    changed = long[:40] + [7 if t != 7 else 8 for t in long[40:-2]] + long[-2:]  # same first 40, new later context
    ckpt = GOLDEN / "chatglm_v1" / "checkpoint"
    with tiny_llm(ckpt, "chatglm", max_seq_len=128) as llm:
        (plain_changed,) = llm.generate([changed], GREEDY)
    with glm_llm(ckpt, "chatglm", 128, block=4, reuse_cache=True) as llm:
        (first,) = llm.generate([long], GREEDY)
        (other,) = llm.generate([changed], GREEDY)
        (again,) = llm.generate([long], GREEDY)
    assert first.aux_info["reuse_len"] == 0
    assert other.aux_info["reuse_len"] == 0  # 40 shared leading tokens, but a different bidirectional context
    assert again.aux_info["reuse_len"] >= 52  # identical prompt: every full block of it
    assert first.token_ids == again.token_ids == expected["greedy_long"].tolist()
    check_steps(again, expected["greedy_logits_long"])
    assert other.token_ids == plain_changed.token_ids
    for a, b in zip(other.logprobs, plain_changed.logprobs, strict=True):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


# ---- GLM-130B ----------------------------------------------------------------------------------------------------


def test_glm_reference_matches_chatglm_v1_golden():
    """The test's own GLM v1 reference reproduces the original implementation's logits: it may be trusted for the
    GLM-130B skeleton, which has no golden data."""
    inputs, expected = _golden("chatglm_v1")
    state = read_bin_checkpoint(GOLDEN / "chatglm_v1" / "checkpoint")
    for inp in inputs:
        logits = glm_v1_reference_logits(
            state,
            inp["input_ids"],
            heads=4,
            sop=V1_IDS["sop"],
            mask_priority=(V1_IDS["gmask"], V1_IDS["mask"]),
            gmask=V1_IDS["gmask"],
            two_d=True,
            geglu=False,
            alpha=math.sqrt(2 * 28),  # ChatGLM-6B's GLMBlock keeps its default of 28 layers
        )
        want = expected[f"logits_{inp['name']}"]
        assert (logits - want).abs().max() <= _tol(want), inp["name"]


GLM_130B_CONFIG = dict(
    vocab_size=384,
    hidden_size=64,
    num_layers=3,
    num_attention_heads=4,
    inner_hidden_size=96,
    mask_token_id=370,
    gmask_token_id=371,
    smask_token_id=372,
    bos_token_id=374,
    eos_token_id=375,
)


def _glm_130b_checkpoint(folder) -> dict[str, torch.Tensor]:
    """Random GLM-130B weights under the merged SAT/HF names (fp16, as released), with sublayer outputs scaled up
    so they are not swamped by the DeepNorm residual."""
    g = torch.Generator().manual_seed(130)
    cfg = GLM_130B_CONFIG
    h, inner, vocab = cfg["hidden_size"], cfg["inner_hidden_size"], cfg["vocab_size"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).half()

    state = {"transformer.word_embeddings.weight": rand(vocab, h, std=1.0)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[p + name + ".weight"] = (1 + rand(h, std=0.1)).half()
            state[p + name + ".bias"] = rand(h, std=0.1)
        state[p + "attention.query_key_value.weight"] = rand(3 * h, h, std=0.3)
        state[p + "attention.query_key_value.bias"] = rand(3 * h, std=0.3)
        state[p + "attention.dense.weight"] = rand(h, h, std=1.0)
        state[p + "attention.dense.bias"] = rand(h, std=0.5)
        state[p + "mlp.dense_h_to_4h.weight"] = rand(2 * inner, h, std=0.3)
        state[p + "mlp.dense_h_to_4h.bias"] = rand(2 * inner, std=0.3)
        state[p + "mlp.dense_4h_to_h.weight"] = rand(h, inner, std=1.0)
        state[p + "mlp.dense_4h_to_h.bias"] = rand(h, std=0.5)
        state[p + "attention.rotary_emb.inv_freq"] = torch.zeros(h // cfg["num_attention_heads"] // 2).half()
    state["transformer.final_layernorm.weight"] = (1 + rand(h, std=0.1)).half()
    state["transformer.final_layernorm.bias"] = rand(h, std=0.1)
    save_sharded(state, folder, "bin")
    (folder / "config.json").write_text(json.dumps(cfg))
    return state


def test_glm_130b_against_reference(tmp_path):
    """GeGLU, 1D rotary with fp16 frequencies, DeepNorm with alpha = sqrt(2 * layers), tied output, [gMASK] (plain
    positions) and [MASK]/[sMASK] (positions pinned at the mask from <sop> on) prompts, alone and batched."""
    folder = tmp_path / "glm130b"
    state = _glm_130b_checkpoint(folder)
    cfg = GLM_130B_CONFIG
    mask, gmask, smask, sop, eos = (
        cfg[k] for k in ("mask_token_id", "gmask_token_id", "smask_token_id", "bos_token_id", "eos_token_id")
    )
    text = random_prompts(360, [5, 19, 11, 30], seed=5)
    prompts = [
        text[0] + [gmask, sop],  # generation after the text
        text[1] + [gmask, eos, sop],  # generate.py's layout when the text does not end with a mask
        text[2][:4] + [mask] + text[2][4:] + [eos, sop],  # blank filling
        text[3][:10] + [smask] + text[3][10:] + [gmask, eos, sop],  # [sMASK] wins over [gMASK] (generate.py)
    ]

    def logits_fn(ids):
        return glm_v1_reference_logits(
            state,
            ids,
            heads=4,
            sop=sop,
            mask_priority=(mask, smask, gmask),
            gmask=gmask,
            two_d=False,
            geglu=True,
            alpha=math.sqrt(2 * cfg["num_layers"]),
        )

    steps = 16
    cfg_gen = GenerateConfig(max_new_tokens=steps, top_k=1, ignore_eos=True, logprobs=5)
    with tiny_llm(folder, "glm_130b", max_seq_len=128) as llm:
        for batch in (prompts[:1], prompts):
            outs = llm.generate(batch, cfg_gen)
            for prompt, out in zip(batch, outs, strict=True):
                tokens, ref = reference_greedy(logits_fn, prompt, steps)
                assert out.token_ids == tokens
                for step, entry in enumerate(out.logprobs):
                    for token, lp in entry.items():
                        assert abs(lp - float(ref[step, token])) < 1e-3, (step, token)
        assert len({t for out in outs for t in out.token_ids}) > 4  # the model does not just repeat one token


# ---- ChatGLM2 / ChatGLM3 against transformers' GlmForCausalLM ---------------------------------------------------


@pytest.mark.parametrize(
    "model_type,fmt,rope_ratio,rope_parameters",
    [
        ("chatglm2", "bin", None, {}),
        ("chat_glm_2", "safetensors", 4.0, {"rope_type": "linear", "factor": 4.0}),  # chatglm2-6b-32k: interpolation
        ("chatglm3", "safetensors", None, {}),
        ("chat_glm_3", "bin", 50.0, {"rope_theta": 500000.0}),  # chatglm3-6b-32k: base * rope_ratio
    ],
)
def test_chatglm2_3_against_transformers_glm(tmp_path, model_type, fmt, rope_ratio, rope_parameters):
    model = tiny_glm(11, rope_parameters)
    folder = tmp_path / model_type
    save_sharded(glm_to_chatglm2_state(model), folder, fmt)
    extra = {"rope_ratio": rope_ratio} if rope_ratio else {}
    (folder / "config.json").write_text(json.dumps(chatglm2_config(model.config, 8192, **extra)))
    with tiny_llm(folder, model_type, max_seq_len=256) as llm:
        prompts = random_prompts(320, [5, 9, 17, 23, 3, 31, 12, 40], seed=6)
        check_parity(llm, model, prompts[:1])
        check_parity(llm, model, prompts)


def test_chatglm2_refuses_quantized_checkpoints(tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(GOLDEN / "chatglm2" / "checkpoint", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_bit": 4}))
    from rtp_mm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="quantization_bit=4"):
        tiny_llm(folder, "chatglm2", max_seq_len=64)


# ---- scheduler / block manager units (pure Python) ----------------------------------------------------------------


def test_scheduler_never_chunks_a_prefix_lm_prompt():
    """Budget 16: a plain 10-token prompt takes the first step; the 12-token prefix-LM prompt behind it is not split
    over two steps (a plain one would be), but waits and then runs whole."""
    from rtp_mm.llm.engine.block_manager import BlockManager
    from rtp_mm.llm.engine.request import Request
    from rtp_mm.llm.engine.scheduler import Scheduler

    def run(bidirectional_len: int) -> list[list[tuple[int, int, int]]]:
        sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=16, watermark_blocks=0)
        plain = Request(1, list(range(10, 20)), GenerateConfig(), max_total_len=12)
        layout = PromptLayout(bidirectional_len=bidirectional_len)
        glm = Request(2, list(range(30, 42)), GenerateConfig(), max_total_len=14, layout=layout)
        for req in (plain, glm):
            sched.add(req)
        steps = []
        for _ in range(2):
            batch = sched.schedule()
            sched.advance()
            steps.append([(s.request_id, s.start, s.num_new_tokens) for s in batch.seqs])
            for req in (plain, glm):
                if any(s.sample and s.request_id == req.request_id for s in batch.seqs):
                    req.output_ids.append(1)
        return steps

    assert run(0) == [[(1, 0, 10), (2, 0, 6)], [(1, 10, 1), (2, 6, 6)]]  # causal: chunked
    assert run(11) == [[(1, 0, 10)], [(1, 10, 1), (2, 0, 12)]]  # prefix-LM: whole


def test_block_hashes_of_a_prefix_lm_prompt_cover_its_context():
    """Two prompts with the same first block: shared hashes when causal, distinct when the first block's K/V also
    depend on the differing later context (bidirectional); identical prefix-LM prompts still share."""
    from rtp_mm.llm.engine.block_manager import BlockManager
    from rtp_mm.llm.engine.request import Request

    bm = BlockManager(16, 4, enable_prefix_caching=True)

    def hashes(request_id: int, prompt: list[int], bidirectional_len: int) -> list[bytes]:
        layout = PromptLayout(bidirectional_len=bidirectional_len)
        req = Request(request_id, prompt, GenerateConfig(), max_total_len=32, layout=layout)
        return bm._full_block_hashes(req, len(prompt))

    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 99, 9]
    assert hashes(1, a, 0)[0] == hashes(2, b, 0)[0]
    assert hashes(3, a, 8)[0] != hashes(4, b, 8)[0]
    assert hashes(5, a, 8) == hashes(6, list(a), 8)


def test_glm_130b_defaults_are_the_released_model():
    """GLM-130B ships no config.json of its own: an empty one gives the released shape (RTP-LLM hard-codes it)."""
    from rtp_mm.llm.models.chatglm import glm_130b_build

    spec = glm_130b_build({}, set(), "glm_130b").spec
    shape = (spec.num_layers, spec.hidden_size, spec.num_heads, spec.head_dim, spec.intermediate_size, spec.vocab_size)
    assert shape == (70, 12288, 96, 128, 32768, 150528)
    assert spec.gated_mlp and spec.activation == "gelu" and spec.tie_word_embeddings
    assert spec.norm_residual_alpha == pytest.approx(math.sqrt(140))
    assert spec.prefix_lm == PrefixLM(sop_id=150004, mask_ids=(150000, 150002, 150001), gmask_id=150001, two_d=False)
