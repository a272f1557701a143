"""LOAD_CKPT_NUM_PROCESS: a sharded checkpoint read by worker processes gives bit-identical weights.

The oracle is the serial reader (num_load_processes=1) on the same files, which the checkpoint-reader and parity tests
check against what was written and against HF transformers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtp_mm.errors import CheckpointError, ConfigError
from rtp_mm.llm.loader import ShardedCheckpoint, open_checkpoint, parallel
from rtp_mm.llm.loader.parallel import auto_num_processes, iter_tensors_parallel
from rtp_mm.llm.models.load import load_model
from rtp_mm_testing.oracle import tiny_llama


def _to_bin(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """Rewrite a sharded safetensors folder as sharded PyTorch .bin files (transformers 5 only writes safetensors)."""
    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    weight_map = {}
    for i, file in enumerate(sorted(src.glob("*.safetensors")), start=1):
        shard = f"pytorch_model-{i:05d}.bin"
        tensors = {name: t.to(dtype) for name, t in load_file(str(file)).items()}
        torch.save(tensors, dst / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    model = tiny_llama(seed=0, vocab_size=256, intermediate_size=128, tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(str(root / "safetensors"), max_shard_size="100KB")
    # bf16 shards: packing must keep 2-byte tensors exact too
    return {"safetensors": root / "safetensors", "bin": _to_bin(root / "safetensors", root / "bin", torch.bfloat16)}


def _load(path: Path, num_load_processes: int):
    start = time.perf_counter()
    loaded = load_model("llama", "llama", str(path), torch.float32, "cpu", num_load_processes=num_load_processes)
    return loaded, time.perf_counter() - start


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_two_processes_give_bit_identical_weights(checkpoints, fmt):
    path = checkpoints[fmt]
    assert len(open_checkpoint(path).files) >= 3
    serial, serial_s = _load(path, 1)
    spawned, spawned_s = _load(path, 2)
    print(f"{fmt}: load 1 process {serial_s:.2f} s, 2 processes {spawned_s:.2f} s")
    expected = dict(serial.model.named_parameters())
    actual = dict(spawned.model.named_parameters())
    assert expected.keys() == actual.keys()
    for name, param in expected.items():
        assert actual[name].dtype == param.dtype and torch.equal(actual[name], param), name
    assert multiprocessing.active_children() == []


def _write_odd_shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A .bin checkpoint with the tensors packing could get wrong: scalars, empty, odd sizes, bool, views."""
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    shards = {
        "a.bin": {
            "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 5),
            "odd_int8": torch.arange(7, dtype=torch.int8),
        },
        "b.bin": {
            "mask": torch.tensor([True, False, True]),
            "transposed": base.t(),  # a non-contiguous view of a bigger storage
            "half": torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).half(),
        },
        "c.bin": {"int64": torch.tensor([-(2**62), 2**62 + 1])},
    }
    folder.mkdir()
    for file, tensors in shards.items():
        torch.save(tensors, folder / file)
    index = {"weight_map": {name: file for file, tensors in shards.items() for name in tensors}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return shards


def test_packed_shard_round_trip_matches_serial_reader(tmp_path):
    # In-process: the worker function and the shared-memory pickling it relies on, without paying for a spawn.
    shards = _write_odd_shards(tmp_path / "odd")
    written = {name: t for tensors in shards.values() for name, t in tensors.items()}
    ckpt = open_checkpoint(tmp_path / "odd")
    serial = list(ckpt.iter_tensors())
    spawned = []
    for file in ckpt.files:
        packed = parallel._read_shard(file, ckpt.format, list(shards[file.name]))
        spawned += list(pickle.loads(ForkingPickler.dumps(packed)).tensors())
    assert [name for name, _ in spawned] == [name for name, _ in serial]
    for (name, got), (_, want) in zip(spawned, serial, strict=True):
        assert got.dtype == want.dtype == written[name].dtype, name
        assert got.shape == want.shape and torch.equal(got, want) and torch.equal(got, written[name]), name


@pytest.mark.timeout(60)
def test_corrupt_shard_raises_checkpoint_error_naming_it(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints["bin"], tmp_path / "corrupt")
    bad = sorted(folder.glob("pytorch_model-*.bin"))[1]
    bad.write_bytes(b"not a torch checkpoint" * 100)
    with pytest.raises(CheckpointError, match=bad.name):
        _load(folder, 2)
    assert multiprocessing.active_children() == []  # every worker was joined


def test_single_file_checkpoint_reads_in_process(tmp_path, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a single-file checkpoint must not start loader processes")

    monkeypatch.setattr(parallel, "ProcessPoolExecutor", no_pool)
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = dict(iter_tensors_parallel(open_checkpoint(tmp_path), 4))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_automatic_count(checkpoints, tmp_path):
    assert auto_num_processes(open_checkpoint(checkpoints["safetensors"])) == 1  # 5 shards but under 1 GB
    # Only file sizes matter to the rule: sparse files stand in for a 1.5 GB checkpoint in 3 shards.
    files = [tmp_path / f"model-{i}.safetensors" for i in range(3)]
    for file in files:
        with open(file, "wb") as fh:
            fh.truncate(512 << 20)
    big = ShardedCheckpoint(tmp_path, "safetensors", {f"t{i}": file for i, file in enumerate(files)})
    assert auto_num_processes(big) == min(4, 3, os.cpu_count() or 1)
    one_big = ShardedCheckpoint(tmp_path, "safetensors", {"t": files[0], "u": files[0]})
    assert auto_num_processes(one_big) == 1


def test_negative_count_is_a_config_error(checkpoints):
    with pytest.raises(ConfigError, match="LOAD_CKPT_NUM_PROCESS=-1"):
        load_model("llama", "llama", str(checkpoints["safetensors"]), torch.float32, "cpu", num_load_processes=-1)
