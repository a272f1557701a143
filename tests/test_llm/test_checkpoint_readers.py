"""Checkpoint readers: safetensors, PyTorch .bin (single and sharded) and GGUF, plus their failure messages.

Every expected value comes from what the test wrote (the original tensors), never from the reader under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.loader import Checkpoint, checkpoint, open_checkpoint

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}
GENERATION_CONFIG = {"eos_token_id": 2, "temperature": 0.7}


def make_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen).to(torch.float16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=gen),
        "lm_head.weight": torch.randn(10, 8, generator=gen),
    }


SHARDS = {  # shard file stem -> the tensor names it holds
    "00001-of-00002": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
    "00002-of-00002": ["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"],
}


def write_folder(folder: Path, fmt: str, sharded: bool) -> dict[str, torch.Tensor]:
    tensors = make_tensors()
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    save = (lambda d, p: save_file(d, str(p))) if fmt == "safetensors" else (lambda d, p: torch.save(d, p))
    if not sharded:
        save(tensors, folder / f"{stem}.{suffix}")
        return tensors
    weight_map = {}
    for shard, names in SHARDS.items():
        filename = f"{stem}-{shard}.{suffix}"
        save({n: tensors[n] for n in names}, folder / filename)
        weight_map.update({n: filename for n in names})
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reads_every_tensor_as_written(tmp_path, fmt, sharded):
    tensors = write_folder(tmp_path / "ckpt", fmt, sharded)
    with open_checkpoint(tmp_path / "ckpt") as ckpt:
        assert isinstance(ckpt, Checkpoint)
        assert ckpt.format == fmt
        assert len(ckpt.files) == (2 if sharded else 1) and all(f.is_file() for f in ckpt.files)
        assert sorted(ckpt.keys()) == sorted(tensors)
        for name, expected in tensors.items():
            assert_same(ckpt.get(name), expected)
        streamed = list(ckpt.iter_tensors())
        assert sorted(name for name, _ in streamed) == sorted(tensors)  # each name exactly once
        for name, tensor in streamed:
            assert_same(tensor, tensors[name])
        assert ckpt.config() == CONFIG
        assert ckpt.generation_config() == GENERATION_CONFIG


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_iter_tensors_opens_each_shard_once(tmp_path, fmt, monkeypatch):
    write_folder(tmp_path / "ckpt", fmt, sharded=True)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    opened = []
    real_open = checkpoint._open_shard
    monkeypatch.setattr(checkpoint, "_open_shard", lambda file, f: opened.append(file.name) or real_open(file, f))
    names = [name for name, _ in ckpt.iter_tensors()]
    assert len(names) == 5
    assert sorted(opened) == sorted(set(opened)) and len(opened) == 2


def test_single_weight_file_path_and_missing_generation_config(tmp_path):
    tensors = make_tensors()
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    ckpt = open_checkpoint(tmp_path / "weights.safetensors")
    assert ckpt.format == "safetensors" and sorted(ckpt.keys()) == sorted(tensors)
    assert ckpt.generation_config() is None
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt.config()


def test_standard_file_wins_over_other_weight_files(tmp_path):
    tensors = write_folder(tmp_path, "safetensors", sharded=False)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(tmp_path / "consolidated.safetensors"))
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    assert [f.name for f in ckpt.files] == ["model.safetensors"] and sorted(ckpt.keys()) == sorted(tensors)


def test_bin_wrapped_state_dict_and_pt_suffix(tmp_path):
    tensors = make_tensors()
    torch.save({"state_dict": tensors, "step": 3}, tmp_path / "consolidated.pt")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")  # must be ignored
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "bin" and [f.name for f in ckpt.files] == ["consolidated.pt"]
    assert_same(ckpt.get("model.norm.weight"), tensors["model.norm.weight"])


def test_unknown_tensor_name_is_named(tmp_path):
    write_folder(tmp_path / "ckpt", "safetensors", sharded=False)
    with pytest.raises(CheckpointError, match="model.layers.9.nope"):
        open_checkpoint(tmp_path / "ckpt").get("model.layers.9.nope")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found") as info:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in info.value.message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_is_named(tmp_path, fmt):
    write_folder(tmp_path / "ckpt", fmt, sharded=True)
    missing = next((tmp_path / "ckpt").glob("*00002-of-00002*"))
    missing.unlink()
    with pytest.raises(CheckpointError, match=missing.name):
        open_checkpoint(tmp_path / "ckpt")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_safetensors_is_named_at_open(tmp_path, sharded):
    write_folder(tmp_path / "ckpt", "safetensors", sharded)
    victim = sorted((tmp_path / "ckpt").glob("*.safetensors"))[-1]
    truncate(victim)
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(tmp_path / "ckpt")


def test_truncated_bin_is_named(tmp_path):
    write_folder(tmp_path / "ckpt", "bin", sharded=False)
    truncate(tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path / "ckpt")


def test_truncated_bin_shard_is_named_when_read(tmp_path):
    write_folder(tmp_path / "ckpt", "bin", sharded=True)
    victim = tmp_path / "ckpt" / "pytorch_model-00002-of-00002.bin"
    truncate(victim)
    ckpt = open_checkpoint(tmp_path / "ckpt")  # indexed .bin shards are only read on demand
    with pytest.raises(CheckpointError, match=victim.name):
        list(ckpt.iter_tensors())


# ---------------------------------------------------------------- GGUF

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 128, 32, 2
HEAD_DIM = HIDDEN // HEADS


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {
        "model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)),
        "model.norm.weight": rng.standard_normal(HIDDEN),
        "lm_head.weight": rng.standard_normal((VOCAB, HIDDEN)),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": rng.standard_normal(HIDDEN),
            p + "post_attention_layernorm.weight": rng.standard_normal(HIDDEN),
            p + "self_attn.q_proj.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)),
            p + "self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            p + "self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            p + "self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)),
            p + "mlp.gate_proj.weight": rng.standard_normal((FFN, HIDDEN)),
            p + "mlp.up_proj.weight": rng.standard_normal((FFN, HIDDEN)),
            p + "mlp.down_proj.weight": rng.standard_normal((HIDDEN, FFN)),
        }
    return {k: v.astype(np.float32) for k, v in out.items()}


# HF name -> GGUF name, written out by hand (independent of the reader's table).
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
for _i in range(LAYERS):
    HF_TO_GGUF |= {
        f"model.layers.{_i}.input_layernorm.weight": f"blk.{_i}.attn_norm.weight",
        f"model.layers.{_i}.post_attention_layernorm.weight": f"blk.{_i}.ffn_norm.weight",
        f"model.layers.{_i}.self_attn.q_proj.weight": f"blk.{_i}.attn_q.weight",
        f"model.layers.{_i}.self_attn.k_proj.weight": f"blk.{_i}.attn_k.weight",
        f"model.layers.{_i}.self_attn.v_proj.weight": f"blk.{_i}.attn_v.weight",
        f"model.layers.{_i}.self_attn.o_proj.weight": f"blk.{_i}.attn_output.weight",
        f"model.layers.{_i}.mlp.gate_proj.weight": f"blk.{_i}.ffn_gate.weight",
        f"model.layers.{_i}.mlp.up_proj.weight": f"blk.{_i}.ffn_up.weight",
        f"model.layers.{_i}.mlp.down_proj.weight": f"blk.{_i}.ffn_down.weight",
    }
Q8_0_NAMES = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def write_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, value in tensors.items():
        if hf_name.endswith("q_proj.weight"):  # what llama.cpp's converter does before writing
            value = llamacpp_permute(value, HEADS, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            value = llamacpp_permute(value, HEADS, KV_HEADS)
        if hf_name in Q8_0_NAMES:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(HF_TO_GGUF[hf_name], gguf.quants.quantize(value, q8), raw_dtype=q8)
        else:
            writer.add_tensor(HF_TO_GGUF[hf_name], np.ascontiguousarray(value))
    writer.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, dtype=np.float32))  # llama3-style, dropped
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = hf_llama_tensors()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, tensors)
    return path, tensors


def test_gguf_names_shapes_and_unpermuted_values(gguf_file):
    path, tensors = gguf_file
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and ckpt.files == [path]
    assert sorted(ckpt.keys()) == sorted(tensors)  # rope_freqs dropped, everything else renamed
    for name, expected in tensors.items():
        actual = ckpt.get(name)
        assert actual.dtype == torch.float32 and tuple(actual.shape) == expected.shape, name
        if name in Q8_0_NAMES:
            continue
        assert torch.equal(actual, torch.from_numpy(expected)), name
    assert dict(ckpt.iter_tensors()).keys() == tensors.keys()
    ckpt.close()


def test_gguf_q8_0_dequantizes_close_and_unpermuted(gguf_file):
    path, tensors = gguf_file
    ckpt = open_checkpoint(path)
    for name in Q8_0_NAMES:
        expected = torch.from_numpy(tensors[name])
        actual = ckpt.get(name)
        # Q8_0: per-32 block absmax/127 scale, so the rounding error is at most half a step.
        assert (actual - expected).abs().max() <= expected.abs().max() / 127
    q = torch.from_numpy(tensors["model.layers.1.self_attn.q_proj.weight"])
    still_permuted = torch.from_numpy(llamacpp_permute(q.numpy(), HEADS))
    assert (ckpt.get("model.layers.1.self_attn.q_proj.weight") - still_permuted).abs().max() > 0.5


def test_gguf_config_and_generation_config(gguf_file):
    path, _ = gguf_file
    ckpt = open_checkpoint(path.parent)  # a folder holding one .gguf
    assert ckpt.format == "gguf"
    assert ckpt.config() == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    assert ckpt.generation_config() == {"bos_token_id": 1, "eos_token_id": 2}


def test_gguf_f16_and_bf16_kept_as_stored(tmp_path):
    rng = np.random.default_rng(1)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16)
    norm = rng.standard_normal(HIDDEN).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "half.gguf"), "llama")
    writer.add_head_count(HEADS)
    writer.add_tensor("token_embd.weight", embed)
    bf16 = gguf.GGMLQuantizationType.BF16
    writer.add_tensor("output_norm.weight", gguf.quants.quantize(norm, bf16), raw_dtype=bf16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = open_checkpoint(tmp_path / "half.gguf")
    assert_same(ckpt.get("model.embed_tokens.weight"), torch.from_numpy(embed))
    assert_same(ckpt.get("model.norm.weight"), torch.from_numpy(norm).to(torch.bfloat16))


def test_truncated_gguf_is_named(gguf_file, tmp_path):
    src, _ = gguf_file
    victim = tmp_path / "broken.gguf"
    victim.write_bytes(src.read_bytes())
    truncate(victim, keep=0.6)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        open_checkpoint(victim)
    (tmp_path / "header.gguf").write_bytes(src.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="header.gguf"):
        open_checkpoint(tmp_path / "header.gguf")


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_torch_block_decoders_equal_gguf_py(qtype):
    """rtp-mm decodes Q4_1/Q8_0 with torch; the values must be gguf-py's, bit for bit (every tensor of that type in
    the default model when it is installed, else a synthetic Q8_0 tensor)."""
    from rtp_mm.llm.loader import gguf_reader

    decode = gguf_reader._TORCH_DEQUANTIZE[qtype]
    kind = gguf.GGMLQuantizationType[qtype]
    tensors = []
    try:
        from rtp_mm.default_model import default_model_path

        reader = gguf.GGUFReader(str(default_model_path()))
        tensors = [t.data for t in reader.tensors if t.tensor_type == kind][:12]
    except Exception:
        pass
    if not tensors and qtype == "Q8_0":
        tensors = [gguf.quants.quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32), kind)]
    if not tensors:
        pytest.skip(f"no {qtype} tensor available")
    for data in tensors:
        expected = torch.from_numpy(gguf.quants.dequantize(data, kind))
        got = decode(torch.from_numpy(np.array(data)))
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got, expected)


def test_own_gguf_parser_equals_gguf_py(gguf_file):
    """rtp-mm parses GGUF itself (gguf-py decodes every vocabulary entry, seconds per load): same tensors, same
    types and shapes, the same scalar metadata; arrays are stepped over with their length kept."""
    from rtp_mm.llm.loader.gguf_format import GGUFArray, GGUFFile

    paths = [gguf_file[0]]
    try:
        from rtp_mm.default_model import default_model_path

        paths.append(default_model_path())
    except Exception:
        pass
    for path in paths:
        ours, ref = GGUFFile(path), gguf.GGUFReader(path)
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for a, b in zip(ours.tensors, ref.tensors, strict=True):
            assert a.tensor_type == b.tensor_type and a.data.shape == b.data.shape, a.name
            assert np.array_equal(a.data, b.data), a.name
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):  # gguf-py's pseudo-fields for the header
                continue
            value, kind = ours.metadata[key], field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                assert isinstance(value, GGUFArray) and value.length == len(field.data), key
            elif kind == gguf.GGUFValueType.STRING:
                assert value == bytes(field.parts[field.data[0]]).decode(), key
            else:
                assert value == field.parts[field.data[0]].tolist()[0], key
