"""GGUF checkpoints (llama.cpp's format) read as if they were Hugging Face Llama checkpoints.

Three things differ from a Hugging Face checkpoint, and this module undoes each one:

- names: ``blk.N.attn_q.weight`` instead of ``model.layers.N.self_attn.q_proj.weight`` (table ``GGUF_TO_HF``);
- values: most tensors are block-quantized (Q4_1, Q8_0, ...); they are dequantized to float32 on read;
- layout: llama.cpp's converter permutes the rows of q_proj and k_proj within each head so that its rotary embedding
  can rotate adjacent pairs; Hugging Face rotates the two halves of a head, so the rows are permuted back.

The configuration is rebuilt from the metadata as an HF-style ``config.json`` dict.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rtp_mm.errors import CheckpointError
from rtp_mm.llm.loader.gguf_format import GGUFArray, GGUFFile

# GGUF tensor name -> HF name; "{}" stands for the layer index, None drops the tensor.
GGUF_TO_HF: dict[str, str | None] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    # Precomputed rotary tables: derived from the config by the model, never loaded.
    "rope_freqs.weight": None,
    "blk.{}.attn_rot_embd": None,
}

# GGUF general.architecture -> (HF architectures entry, HF model_type, q/k rows permuted by the converter).
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama", True)}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor; None when it is dropped; unknown names come back unchanged (the loader reports
    them as unexpected keys)."""
    match = _LAYER.match(gguf_name)
    pattern = _LAYER.sub("blk.{}.", gguf_name) if match else gguf_name
    if pattern not in GGUF_TO_HF:
        return gguf_name
    hf_name = GGUF_TO_HF[pattern]
    return hf_name.format(match.group(1)) if (hf_name and match) else hf_name


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute(w, n_head)`` of q/k projection rows (weights ``[out, in]`` or biases ``[out]``).

    The converter reshapes each head's rows as ``[2, head_dim // 2]`` and swaps the two axes, turning rotary halves
    into interleaved pairs; reshaping as ``[head_dim // 2, 2]`` and swapping back restores the HF order.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise CheckpointError(f"cannot un-permute {rows} rotary rows over {num_heads} heads")
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
    """One GGUF file seen through HF Llama names.

    Invariants: ``keys()`` holds the HF name of every tensor that is not dropped; ``get`` returns torch-shaped tensors
    (``[out, in]``), F32/F16/BF16 as stored, quantized types dequantized to float32, q/k rows in HF order. The file
    stays memory-mapped until ``close()``; only the tensor asked for is materialised. ``reader`` is the underlying
    ``GGUFFile`` (raw metadata and tensors, see gguf_format.py), None after ``close()``.
    """

    format = "gguf"

    def __init__(self, file: str | Path):
        self.path = Path(file)
        self.files = [self.path]
        try:
            self.reader = GGUFFile(self.path)
        except Exception as exc:  # bad magic, truncated header or tensor data, unknown version
            raise CheckpointError(
                f"{self.path}: cannot be parsed as GGUF: truncated, corrupt or not a GGUF file "
                f"({type(exc).__name__}: {exc})"
            ) from None
        self.architecture = str(self.metadata("general.architecture", ""))
        if self.architecture not in _ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"accepted: {', '.join(_ARCHITECTURES)}"
            )
        self._tensors = {}  # HF name -> gguf ReaderTensor, in file order
        for tensor in self.reader.tensors:
            hf_name = gguf_to_hf_name(tensor.name)
            if hf_name is not None:
                self._tensors[hf_name] = tensor

    def metadata(self, key: str, default=None):
        """A scalar or string metadata value (arrays are not needed here and not decoded)."""
        value = self.reader.metadata.get(key)
        if value is None or isinstance(value, GGUFArray):
            return default
        if isinstance(value, float):
            # The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06), as config.json has it.
            return float(str(np.float32(value)))
        return value

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str, part: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``; with ``part`` = (dim, start, stop, full) only rows [start, stop) of dim 0 are decoded
        (a quantized row is a run of whole blocks: the rows are cut from the raw bytes first). Other dims, and a
        tensor not ``full`` rows long, are returned whole."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.path}")
        rows = None
        if part is not None and part[0] == 0 and len(tensor.data.shape) >= 2 and tensor.data.shape[0] == part[3]:
            rows = slice(part[1], part[2])
        weight = self._to_torch(tensor, rows)
        if _ARCHITECTURES[self.architecture][2]:
            # The rotary row permutation is within each head, and a slice holds whole heads: same head size.
            head_count = {".attn_q.": self._num_heads(), ".attn_k.": self._num_kv_heads()}
            for marker, heads in head_count.items():
                if marker in tensor.name:
                    head_rows = tensor.data.shape[0] // heads
                    weight = unpermute_rotary_rows(weight, weight.shape[0] // head_rows)
        return weight

    def iter_tensors(self, select=None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in list(self._tensors):
            yield name, self.get(name, select(name) if select is not None else None)

    def config(self) -> dict:
        arch = self.architecture
        hidden_size = int(self.metadata(f"{arch}.embedding_length"))
        num_heads = self._num_heads()
        embed = self._tensors.get("model.embed_tokens.weight")
        vocab_size = self.metadata(f"{arch}.vocab_size") or (int(embed.shape[-1]) if embed is not None else None)
        config = {
            "architectures": [_ARCHITECTURES[arch][0]],
            "model_type": _ARCHITECTURES[arch][1],
            "hidden_size": hidden_size,
            "intermediate_size": self.metadata(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self.metadata(f"{arch}.block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._num_kv_heads(),
            "head_dim": self.metadata(f"{arch}.attention.key_length", hidden_size // num_heads),
            "rms_norm_eps": self.metadata(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self.metadata(f"{arch}.rope.freq_base", 10000.0),
            "vocab_size": vocab_size,
            "max_position_embeddings": self.metadata(f"{arch}.context_length", 2048),
            "bos_token_id": self.metadata("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata("tokenizer.ggml.eos_token_id"),
            # llama.cpp writes no output.weight when the LM head reuses the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "torch_dtype": "float32",
        }
        rope_type = self.metadata(f"{arch}.rope.scaling.type")
        if rope_type and rope_type != "none":
            config["rope_scaling"] = {"rope_type": rope_type, "factor": self.metadata(f"{arch}.rope.scaling.factor")}
            original = self.metadata(f"{arch}.rope.scaling.original_context_length")
            if original:
                config["rope_scaling"]["original_max_position_embeddings"] = original
        return config

    def generation_config(self) -> dict | None:
        ids = {k: self.metadata(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
        ids = {k: v for k, v in ids.items() if v is not None}
        return ids or None

    def close(self) -> None:
        self._tensors = {}
        self.reader = None  # drops the memory map

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _num_heads(self) -> int:
        return int(self.metadata(f"{self.architecture}.attention.head_count"))

    def _num_kv_heads(self) -> int:
        return int(self.metadata(f"{self.architecture}.attention.head_count_kv", self._num_heads()))

    def _to_torch(self, tensor, rows: slice | None = None) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        data = tensor.data if rows is None else tensor.data[rows]  # a view of the map: only these rows are read
        try:
            if tensor.tensor_type in (Q.F32, Q.F16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
                return torch.from_numpy(np.array(data))  # already shaped in torch order; copied off the map
            if tensor.tensor_type == Q.BF16:  # stored as raw bytes [..., 2 * cols]
                return torch.from_numpy(np.array(data)).view(torch.bfloat16)
            # Block-quantized: bytes [..., num_blocks * block_bytes] -> float32 [..., cols].
            fast = _TORCH_DEQUANTIZE.get(tensor.tensor_type.name)
            if fast is not None:
                return fast(torch.from_numpy(np.array(data)))
            return torch.from_numpy(dequantize(data, tensor.tensor_type))
        except Exception as exc:
            raise CheckpointError(
                f"{self.path}: cannot decode tensor {tensor.name!r} of type {tensor.tensor_type.name} ({exc})"
            ) from None


def _dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks of 32 values, 20 bytes each: scale d (fp16), minimum m (fp16), 16 bytes of 4-bit codes (value j in
    the low nibble of byte j, value j + 16 in its high nibble); x = d * q + m computed in float32, as gguf-py does."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    codes = blocks[:, 4:]
    q = torch.cat([codes & 0x0F, codes >> 4], dim=1).float()
    return (d * q + m).reshape(*raw.shape[:-1], -1)


def _dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of 32 values, 34 bytes each: scale d (fp16) and 32 int8 codes; x = d * q in float32."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(*raw.shape[:-1], -1)


# The block formats of the shipped default model, decoded with torch: the same float32 values as gguf-py's numpy
# decoder (tested bit for bit) at a fraction of the time (its Q4_1 path dominated start-up). Other types use gguf-py.
_TORCH_DEQUANTIZE = {"Q4_1": _dequantize_q4_1, "Q8_0": _dequantize_q8_0}


def load_gguf_tokenizer(gguf_path: str | Path):
    """A ``PreTrainedTokenizerFast`` built by transformers from the GGUF tokenizer metadata, chat template included.

    Runs offline (``local_files_only``); any failure becomes a CheckpointError naming the file.
    """
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build a tokenizer from the GGUF metadata ({exc})") from None
