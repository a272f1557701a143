"""P-tuning v2 (PTUNING_PATH): where a prefix encoder is found, and the per-layer K/V it stands for.

ChatGLM's P-tuning v2 trains only ``transformer.prefix_encoder``: an embedding of ``pre_seq_len`` rows (and, with
``prefix_projection``, a two-layer tanh MLP ``trans.0`` / ``trans.2``) whose output, viewed as
``[pre_seq_len, num_layers * 2, kv_heads, head_dim]``, is every layer's past K (even rows) and V (odd rows). The
original model feeds those as ``past_key_values``: the keys are used as stored (never rotated), and the prompt's own
positions still start at 0. Because the prefix depends on no request, it is computed once here at start-up and the
engine keeps it in reserved KV blocks (``rtp_mm.llm.engine.kv_prefix``).

Only families whose declaration says ``ptuning=True`` (the ChatGLM ones, as in RTP-LLM) give the prefix that meaning;
any other family is refused at start-up, as is a P-tuning folder RTP-LLM would pick up without being asked
(``<ckpt>/ptuning``), so a prefix is never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rtp_mm.errors import CheckpointError, ConfigError
from rtp_mm.llm.loader import open_checkpoint
from rtp_mm.llm.models import FAMILIES
from rtp_mm.llm.models.decoder import DecoderSpec

PREFIX = "transformer.prefix_encoder."
EMBEDDING = PREFIX + "embedding.weight"
AUTO_DIR = "ptuning"  # RTP-LLM's default: <CHECKPOINT_PATH>/ptuning


def find_ptuning(family: str, model_type: str, ckpt_path: str, ptuning_path: str | None) -> str | None:
    """The P-tuning source of a model: PTUNING_PATH, else ``<ckpt>/ptuning``, else the checkpoint itself when its
    config.json sets ``pre_seq_len`` (a prefix encoder saved with the model). None when there is none. A source for a
    family without P-tuning support raises ConfigError naming the family and PTUNING_PATH."""
    how = "PTUNING_PATH"
    if not ptuning_path and ckpt_path:
        auto = Path(ckpt_path) / AUTO_DIR
        if auto.is_dir():
            ptuning_path, how = str(auto), f"PTUNING_PATH is not set, but {AUTO_DIR}/ in CHECKPOINT_PATH"
        elif _read_config(Path(ckpt_path)).get("pre_seq_len"):
            ptuning_path, how = ckpt_path, "PTUNING_PATH is not set, but config.json's pre_seq_len in CHECKPOINT_PATH"
    if not ptuning_path:
        return None
    supported = sorted(name for name, f in FAMILIES.items() if f.ptuning)
    if not FAMILIES[family].ptuning:
        raise ConfigError(
            f"{how} ({ptuning_path!r}) asks for a P-tuning v2 prefix, which MODEL_TYPE={model_type} "
            f"(family {family}) does not support: its prefix K/V only have a defined meaning for the families "
            f"{', '.join(supported)}; unset PTUNING_PATH or remove the prefix"
        )
    return ptuning_path


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable JSON file ({e})") from None
    return config if isinstance(config, dict) else {}


def _prefix_tensors(path: str) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    try:
        names = [name for name in ckpt.keys() if name.startswith(PREFIX)]
        return {name.removeprefix(PREFIX): ckpt.get(name).float() for name in names}
    finally:
        ckpt.close()


@torch.inference_mode()
def prefix_kv(path: str, spec: DecoderSpec) -> torch.Tensor:
    """Float32 K/V [num_layers, 2, pre_seq_len, kv_heads, head_dim] of the prefix encoder stored under ``path``.

    The tensors' shapes decide ``pre_seq_len`` and ``prefix_projection``; a config.json beside them must agree, so a
    mismatched P-tuning checkpoint fails here naming the field rather than serving a different prefix."""
    weights = _prefix_tensors(path)
    if "embedding.weight" not in weights:
        raise CheckpointError(f"PTUNING_PATH={path!r}: no {EMBEDDING} tensor (a ChatGLM P-tuning v2 checkpoint)")
    x = weights.pop("embedding.weight")  # [pre_seq_len, embedding width]
    pre_seq_len = x.shape[0]
    projection = "trans.0.weight" in weights
    if projection:  # the original's PrefixEncoder: Linear -> Tanh -> Linear
        x = F.linear(torch.tanh(F.linear(x, weights["trans.0.weight"], weights.get("trans.0.bias"))), *_last(weights))
    unknown = sorted(set(weights) - {"trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"})
    if unknown:
        raise CheckpointError(f"PTUNING_PATH={path!r}: unknown prefix encoder tensors {[PREFIX + k for k in unknown]}")
    config = _read_config(Path(path))
    for field, value in (("pre_seq_len", pre_seq_len), ("prefix_projection", projection)):
        if config.get(field) is not None and config[field] != value:
            raise CheckpointError(
                f"PTUNING_PATH={path!r}: config.json {field}={config[field]!r} but the prefix encoder's tensors "
                f"imply {value!r}"
            )
    width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    if x.shape[1] != width:
        raise CheckpointError(
            f"PTUNING_PATH={path!r}: the prefix encoder yields {x.shape[1]} values per prefix token; this model needs "
            f"{width} = num_layers {spec.num_layers} x 2 x kv_heads {spec.num_kv_heads} x head_dim {spec.head_dim}"
        )
    # [P, L * 2, KVH, D] -> [L, 2, P, KVH, D]: row 2l is layer l's K, row 2l + 1 its V (the original's split(2)).
    kv = x.view(pre_seq_len, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    return kv.permute(1, 2, 0, 3, 4).contiguous()


def _last(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "trans.2.weight" not in weights:
        raise CheckpointError(f"{PREFIX}trans.0.weight without {PREFIX}trans.2.weight: an incomplete prefix_projection")
    return weights["trans.2.weight"], weights.get("trans.2.bias")
