"""LoRA adapters against the peft library: tiny random llama / qwen_2 (and gpt_neox's fused qkv, llava's language
model) with random adapters made by ``peft`` in the test; each adapter's peft-wrapped HF model is the oracle.

Checked: each adapter alone and the three adapters plus the base model in one batch (24 greedy tokens equal, top-5
logprobs within 1e-3), the one-adapter merge against the dynamic path, updates while requests run (a request keeps
the adapter it started with), the prefix cache keyed on the adapter, half/int8 weight storage, and the errors.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import ConfigError, ErrorCode, InvalidRequest, UpdateError
from rtp_mm.kernels.lora import RowGroup, add_lora_, add_lora_stacked_, lora_delta_reference
from rtp_mm.llm.lora.manager import row_groups
from rtp_mm_testing.lora import (
    LLAMA_ADAPTERS,
    NEW_TOKENS,
    AdapterSpec,
    check_against,
    greedy,
    make_adapter,
    make_adapters,
    run_mixed,
)
from rtp_mm_testing.oracle import (
    assert_close_to_reference,
    hf_greedy,
    random_prompts,
    tiny_gpt_neox,
    tiny_llama,
    tiny_llm,
    tiny_qwen2,
)

FAMILIES = {"llama": (tiny_llama, 320), "qwen_2": (tiny_qwen2, 300)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(checkpoint, base model, {name: adapter folder}, {name: peft oracle})"""
    root = tmp_path_factory.mktemp("lora_llama")
    base = tiny_llama(root / "base")
    paths, oracles = make_adapters(base, root, LLAMA_ADAPTERS)
    return root / "base", base, paths, oracles


def test_grouped_update_matches_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g)
    weights = [(torch.randn(r, 16, generator=g), torch.randn(12, r, generator=g)) for r in (2, 5)]
    owner = [0, 0, None, 1, 0, 1, None]  # rows of adapter 0 are not contiguous: an index group
    out = torch.zeros(7, 12)
    for k, (a, b) in enumerate(weights):
        rows = [i for i, o in enumerate(owner) if o == k]
        add_lora_(out, x, torch.tensor(rows), a, b)
    add_lora_(out, x, slice(2, 3), *weights[1])  # a slice group too
    expected = lora_delta_reference(x, [None if o is None else weights[o] for o in owner])
    expected[2] += lora_delta_reference(x[2:3], [weights[1]])[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Stacked: both adapters at once, each row keeping its own adapter's columns.
    a_cat, b_cat = torch.cat([a for a, _ in weights]), torch.cat([b for _, b in weights], dim=1)
    columns = torch.tensor([0, 0, 1, 1, 1, 1, 1])  # adapter of each of the 2 + 5 columns
    mask = (torch.tensor([-1 if o is None else o for o in owner])[:, None] == columns[None, :]).float()
    stacked = add_lora_stacked_(torch.zeros(7, 12), x, a_cat, b_cat, mask)
    torch.testing.assert_close(stacked, lora_delta_reference(x, [None if o is None else weights[o] for o in owner]))


def test_row_groups_merge_contiguous_rows_into_slices():
    class Seq:
        def __init__(self, n, adapter):
            self.num_new_tokens, self.adapter = n, adapter

    a, b = object(), object()
    groups = row_groups([Seq(1, a), Seq(1, a), Seq(3, None), Seq(2, b), Seq(1, a)], torch.device("cpu"))
    by_adapter = {id(g.adapter): g.rows for g in groups}
    assert by_adapter[id(b)] == slice(5, 7)
    assert by_adapter[id(a)].tolist() == [0, 1, 7]
    assert row_groups([Seq(4, None)], torch.device("cpu")) == ()
    assert isinstance(groups[0], RowGroup)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_adapter_and_all_mixed_with_the_base_model_in_one_batch(tmp_path, family, monkeypatch):
    from rtp_mm.llm.lora import layers

    calls = {"grouped": 0, "stacked": 0}  # both forms run: stacked, and grouped where stacking costs too much

    def counted(kind, fn):
        def wrapper(*args):
            calls[kind] += 1
            return fn(*args)

        return wrapper

    monkeypatch.setattr(layers, "add_lora_", counted("grouped", layers.add_lora_))
    monkeypatch.setattr(layers, "add_lora_stacked_", counted("stacked", layers.add_lora_stacked_))
    make_base, vocab = FAMILIES[family]
    base = make_base(tmp_path / "base")
    paths, oracles = make_adapters(base, tmp_path, LLAMA_ADAPTERS)
    prompts = random_prompts(vocab, [6, 17, 11, 29], seed=4)
    with tiny_llm(tmp_path / "base", family) as llm:
        assert llm.update_adapters(paths) == paths
        for name in paths:  # each alone
            (out,) = llm.generate([prompts[0]], greedy(adapter=name))
            check_against(out, oracles[name], prompts[0])
        steps = llm.stats()["step_count"]
        outs = run_mixed(llm, prompts, [None, *paths])  # 4 prompts x (base + 3 adapters), one batch
        # One prefill step and 23 decode steps: the 16 sequences ran in the same steps.
        assert llm.stats()["step_count"] - steps == NEW_TOKENS
        worst = 0.0
        for prompt, row in zip(prompts, outs, strict=True):
            worst = max(worst, check_against(row[0], base, prompt))
            for out, name in zip(row[1:], paths, strict=True):
                worst = max(worst, check_against(out, oracles[name], prompt))
            # Every adapter changes the answer (a test that ignored adapters would fail).
            assert len({tuple(out.token_ids) for out in row}) == len(row)
        print(f"{family}: worst top-5 logprob gap {worst:.2e} over {len(prompts) * 4} sequences, {calls}")
        assert calls["grouped"] and calls["stacked"]


def test_one_adapter_is_merged_and_equals_the_dynamic_path(llama):
    ckpt, base, paths, oracles = llama
    prompts = random_prompts(320, [5, 19, 13], seed=7)
    with tiny_llm(ckpt, "llama") as dynamic:
        dynamic.update_adapters({"all": paths["all"], "qv": paths["qv"]})
        expected = dynamic.generate(prompts, greedy(adapter="all"))
    merged = LLM(
        ModelConfig(model_type="llama", ckpt_path=str(ckpt), weight_type="FP32", lora_infos={"all": paths["all"]}),
        kv_cache_mem_mb=16,
        skip_tokenizer_init=True,
    )
    with merged:
        assert merged.adapters() == {"all": paths["all"]}
        # RTP-LLM's static LoRA: every request gets it, named or not.
        for config in (greedy(adapter="all"), greedy()):
            outs = merged.generate(prompts, config)
            for prompt, out, ref in zip(prompts, outs, expected, strict=True):
                assert out.token_ids == ref.token_ids
                for ours, theirs in zip(out.logprobs, ref.logprobs, strict=True):
                    assert ours.keys() == theirs.keys()
                    assert max(abs(ours[t] - theirs[t]) for t in ours) < 1e-4
                check_against(out, oracles["all"], prompt)
        assert "packed" in merged.client.info.weight_path  # merged before the weights were packed
        with pytest.raises(UpdateError, match="merged") as err:
            merged.add_adapter("qv", paths["qv"])
        assert err.value.error_code == ErrorCode.UPDATE_ERROR


def test_update_while_requests_run(llama):
    """A request keeps the adapter it started with when its name is removed or re-pointed mid-generation."""
    ckpt, base, paths, oracles = llama
    prompt = random_prompts(320, [9], seed=8)[0]
    long = GenerateConfig(max_new_tokens=200, top_k=1, ignore_eos=True, adapter_name="qv")
    with tiny_llm(ckpt, "llama", max_seq_len=256) as llm:
        llm.update_adapters({"qv": paths["qv"], "all": paths["all"]})
        outputs, done = [], threading.Event()
        started = threading.Event()

        def sink(out):
            outputs.append(out)
            if len(out.token_ids) >= 5:
                started.set()
            if out.finished:
                done.set()

        llm.client.submit(llm.make_request(prompt, long), sink)
        assert started.wait(60)
        # "qv" removed, "all" re-pointed at the "mixed" folder, "mixed" added under a new name: one update.
        after = llm.update_adapters({"all": paths["mixed"], "m2": paths["mixed"]})
        assert after == {"all": paths["mixed"], "m2": paths["mixed"]}
        assert not done.is_set(), "the update must land while the request runs"
        mid = llm.generate([prompt], greedy(adapter="all"))[0]  # new requests see the new "all"
        check_against(mid, oracles["mixed"], prompt)
        with pytest.raises(InvalidRequest, match="'qv'"):
            llm.generate([prompt], greedy(adapter="qv"))
        assert done.wait(120)
        final = outputs[-1]
        assert final.error is None and len(final.token_ids) == 200
        assert final.token_ids == hf_greedy(oracles["qv"], prompt, 200)
        assert llm.remove_adapter("m2") == {"all": paths["mixed"]}
        assert llm.add_adapter("qv", paths["qv"]) == {"all": paths["mixed"], "qv": paths["qv"]}


def test_prefix_cache_keys_include_the_adapter(llama):
    ckpt, base, paths, oracles = llama
    prompt = random_prompts(320, [40], seed=9)[0]
    with tiny_llm(ckpt, "llama", reuse_cache=True) as llm:
        llm.update_adapters({"qv": paths["qv"], "all": paths["all"]})
        first = llm.generate([prompt], greedy(adapter="qv"))[0]
        assert first.aux_info["reuse_len"] == 0
        again = llm.generate([prompt], greedy(adapter="qv"))[0]
        assert again.aux_info["reuse_len"] > 0 and again.token_ids == first.token_ids
        for name in ("all", None):  # another adapter, or none, never reads qv's KV blocks
            out = llm.generate([prompt], greedy(adapter=name))[0]
            assert out.aux_info["reuse_len"] == 0
            check_against(out, oracles[name] if name else base, prompt)
        # A name re-pointed at another folder is a new identity: its first request reuses nothing.
        llm.update_adapters({"qv": paths["all"], "all": paths["all"]})
        out = llm.generate([prompt], greedy(adapter="qv"))[0]
        assert out.aux_info["reuse_len"] == 0
        check_against(out, oracles["all"], prompt)


@pytest.mark.parametrize("weight_type", ["FP16", "INT8"])
def test_adapters_over_narrow_weight_storage(llama, weight_type):
    """Half-precision and int8 weights keep the adapter path (the update runs in the activation dtype)."""
    ckpt, base, paths, oracles = llama
    prompts = random_prompts(320, [7, 21], seed=10)
    with tiny_llm(ckpt, "llama") as fp32:
        fp32.update_adapters(paths)
        ref = [out for name in paths for out in fp32.generate(prompts, greedy(adapter=name))]
    with tiny_llm(ckpt, "llama", weight_type=weight_type) as narrow:
        narrow.update_adapters(paths)
        outs = [out for name in paths for out in narrow.generate(prompts, greedy(adapter=name))]
    assert_close_to_reference(ref, outs)


def test_fused_qkv_family_gpt_neox(tmp_path):
    """GPT-NeoX stores q/k/v interleaved per head in one tensor: its LoRA B rows go through the same reordering."""
    base = tiny_gpt_neox(tmp_path / "base", seed=41)
    spec = AdapterSpec(4, 8, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
    oracle = make_adapter(base, tmp_path / "lora", spec, seed=3)
    prompts = random_prompts(300, [8, 15], seed=11)
    with tiny_llm(tmp_path / "base", "gpt_neox") as llm:
        llm.update_adapters({"a": str(tmp_path / "lora"), "b": str(tmp_path / "lora")})
        for prompt, out in zip(prompts, llm.generate(prompts, greedy(adapter="a")), strict=True):
            check_against(out, oracle, prompt)


def test_llava_language_model_adapter_with_an_image(tmp_path):
    from rtp_mm_testing.llava import IMAGE_TOKEN, SIZES, hf_generate, image, processor, save_llava, tiny_llava

    model, proc = tiny_llava("llava"), processor("llava")
    path, extra = save_llava(model, proc, tmp_path / "llava", "save_pretrained")
    targets = r".*language_model.*\.(q_proj|v_proj|down_proj)"  # the LM only: LoRA on the vision tower is refused
    spec = AdapterSpec(4, 8, targets)
    oracle = make_adapter(model, tmp_path / "lora", spec, seed=5)
    images = [image(SIZES[0], 0)]
    chunks = [[1, 5, 9], [17, 4]]
    prompt = [*chunks[0], IMAGE_TOKEN, *chunks[1]]
    with tiny_llm(path, "llava", max_seq_len=256, extra_data_path=extra) as llm:
        llm.update_adapters({"a": str(tmp_path / "lora"), "b": str(tmp_path / "lora")})
        config = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1, ignore_eos=True, adapter_name="a")
        (out,) = llm.generate([prompt], config, images=[images])
        expected = hf_generate(oracle.base_model.model, proc, chunks, images)
        assert out.token_ids == expected
        (plain,) = llm.generate([prompt], config.updated(adapter_name=None), images=[images])
        assert plain.token_ids == hf_generate(model, proc, chunks, images) != expected
        make_adapter(model, tmp_path / "tower", AdapterSpec(2, 4, ("q_proj",)), seed=6)  # the CLIP tower's too
        with pytest.raises(UpdateError, match=r"vision_tower\.\S+ \(not part of the language model\)"):
            llm.add_adapter("tower", str(tmp_path / "tower"))


def test_errors_name_what_is_wrong(llama, tmp_path):
    ckpt, base, paths, oracles = llama
    prompt = random_prompts(320, [5], seed=12)[0]
    dora = tmp_path / "dora"
    make_adapter(base, dora, AdapterSpec(2, 4, ("q_proj",)), seed=1)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    head = tmp_path / "head"
    make_adapter(base, head, AdapterSpec(2, 4, ("q_proj", "lm_head")), seed=1)
    other = tmp_path / "other"
    make_adapter(tiny_llama(hidden_size=32), other, AdapterSpec(2, 4, ("q_proj",)), seed=1)
    with tiny_llm(ckpt, "llama", max_lora_model_size=2) as llm:
        with pytest.raises(InvalidRequest, match="'nope'"):
            llm.generate([prompt], greedy(adapter="nope"))
        cases = {
            str(dora): "use_dora",
            str(head): "lm_head",
            str(other): "another model",
            str(tmp_path / "missing"): "not a local folder",
            str(ckpt): "adapter_config.json",
        }
        for path, words in cases.items():
            with pytest.raises(UpdateError, match=words) as err:
                llm.add_adapter("x", path)
            assert err.value.error_code == 601
        with pytest.raises(UpdateError, match="MAX_LORA_MODEL_SIZE=2"):
            llm.update_adapters(paths)  # three adapters
        with pytest.raises(UpdateError, match="not loaded"):
            llm.remove_adapter("qv")
        assert llm.adapters() == {}  # failed updates change nothing
        assert llm.generate([prompt], greedy())[0].token_ids == hf_greedy(base, prompt, NEW_TOKENS)
    model_config = ModelConfig(model_type="llama", ckpt_path=str(ckpt), weight_type="FP32", lora_infos=dict(paths))
    with pytest.raises(ConfigError, match="MAX_LORA_MODEL_SIZE=1"):
        LLM(model_config, kv_cache_mem_mb=16, skip_tokenizer_init=True, max_lora_model_size=1)


GOLDEN_CASES = ["baichuan2_7b", "chatglm_v1", "chatglm3", "glm4v", "internlm_7b", "qwen_vl", "sgpt_bloom_vector"]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_released_layouts_map_every_projection(case):
    """The released checkpoints of other families (fused W_pack / c_attn / per-head query_key_value, swapped GeGLU
    halves): every projection weight of every layer has a place for LoRA, its family transform a row permutation."""
    from rtp_mm.llm.loader import open_checkpoint
    from rtp_mm.llm.lora.mapping import LoraTargets
    from rtp_mm.llm.models import FAMILIES
    from rtp_mm.model_types import detect_model_type, resolve_model_type
    from rtp_mm_testing.shared import golden

    ckpt = open_checkpoint(str(golden(case, "checkpoint")))
    try:
        config, keys = ckpt.config(), set(ckpt.keys())
    finally:
        ckpt.close()
    info = resolve_model_type(detect_model_type(config) or case)
    family_model = FAMILIES[info.family].build(config, keys, info.name)
    targets = LoraTargets(info.family, family_model)
    assert not targets.refused
    layers = family_model.spec.num_layers
    assert len(targets.modules) == 4 * layers  # qkv, o, the MLP's input projection(s) and down
    rename = family_model.rename or (lambda name: name)
    weights = {rename(k) for k in keys if k.endswith(".weight")}
    assert set(targets.slots) <= weights  # each slot is a real checkpoint weight
    covered = {slot.module for slot in targets.slots.values()}
    assert covered == set(targets.modules)
