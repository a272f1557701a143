"""The prefill-only path for embedding models: final hidden states of whole prompts, and SGPT pooling.

Embedding requests never decode, so they skip the scheduler and the paged KV pool: ``prefill_hidden`` runs one
forward of the engine's own model over a flattened batch of prompts, each a single prefill chunk writing to scratch
KV blocks that are dropped afterwards. It runs on the engine thread between steps (``EngineLoop.call``), so it never
races a generation step for the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rtp_mm.errors import EmptyPromptError, InvalidRequest, PromptTooLongError
from rtp_mm.kernels.attention import AttnMetadata, KVCache, PrefillChunk
from rtp_mm.llm.models.decoder import Decoder


@torch.inference_mode()
def prefill_hidden(model: Decoder, token_lists: list[list[int]], block_size: int) -> list[torch.Tensor]:
    """Final-norm hidden states [len, hidden] (float32, on CPU) of every prompt, computed in one forward."""
    spec = model.spec
    device, dtype = model.norm.weight.device, model.act_dtype
    blocks_per_seq = [-(-len(ids) // block_size) for ids in token_lists]
    shape = (sum(blocks_per_seq), block_size, spec.num_kv_heads, spec.head_dim)
    caches = [
        KVCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    chunks: list[PrefillChunk] = []
    first_block = 0
    for tokens, num_blocks in zip(token_lists, blocks_per_seq, strict=True):
        n = len(tokens)
        chunks.append(
            PrefillChunk(
                q_start=len(ids),
                q_len=n,
                start_pos=0,
                block_table=torch.arange(first_block, first_block + num_blocks, device=device),
            )
        )
        ids.extend(tokens)
        positions.extend(range(n))
        slots.extend(range(first_block * block_size, first_block * block_size + n))
        first_block += num_blocks
    meta = AttnMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=0,
        decode_block_tables=None,
        decode_context_lens=None,
        decode_max_context=0,
        decode_mask=None,
        prefills=tuple(chunks),
        block_size=block_size,
    )
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    seq_lens = torch.tensor([len(t) for t in token_lists for _ in t], dtype=torch.long, device=device)
    hidden = model(torch.tensor(ids, dtype=torch.long, device=device), pos, meta, caches, seq_lens=seq_lens)
    return list(hidden.float().cpu().split([len(t) for t in token_lists]))


def position_weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SGPT pooling: sum_t w_t m_t h_t / sum_t w_t m_t with w_t = t (1-based over the whole, padded, length).

    hidden [T, hidden], mask [T] (1 = real token). Later tokens have seen more of the text in a causal model, hence
    their larger weight; the 1e-9 floor of the sentence-transformers implementation keeps an all-masked row finite.
    """
    weights = torch.arange(1, hidden.shape[0] + 1, dtype=torch.float32) * mask.to(torch.float32)
    return (hidden * weights[:, None]).sum(0) / weights.sum().clamp_min(1e-9)


def check_mask(n: int, ids: list[int], mask: Sequence[int] | None, max_seq_len: int, vocab: int) -> list[int]:
    """Input n's padding mask (all ones when None), checked: 0/1 values, one per token, the ones a single span
    (padding at the ends only), the unpadded tokens within max_seq_len and the vocabulary."""
    mask = [1] * len(ids) if mask is None else list(mask)
    if len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
        raise InvalidRequest(f"attention_mask[{n}] must hold 0/1 values, one per token ({len(ids)} tokens)")
    ones = [i for i, m in enumerate(mask) if m]
    if not ones:
        raise EmptyPromptError(f"input {n} has no unmasked token")
    if ones[-1] - ones[0] + 1 != len(ones):
        raise InvalidRequest(f"attention_mask[{n}] may mask padding at the ends only, not inside the input")
    if len(ones) > max_seq_len:
        raise PromptTooLongError(f"input {n} has {len(ones)} tokens > max_seq_len {max_seq_len}")
    bad = [ids[i] for i in ones if not 0 <= ids[i] < vocab]
    if bad:
        raise InvalidRequest(f"input {n} has token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return mask


def real_span(mask: list[int]) -> tuple[int, int]:
    """[lo, hi) of the unpadded tokens of a checked mask."""
    return mask.index(1), len(mask) - mask[::-1].index(1)


def batch_by_tokens(token_lists: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive groups of at most ``budget`` tokens (one input alone may exceed it): one forward each."""
    groups: list[list[list[int]]] = []
    tokens = 0
    for ids in token_lists:
        if groups and tokens + len(ids) <= budget:
            groups[-1].append(ids)
            tokens += len(ids)
        else:
            groups.append([ids])
            tokens = len(ids)
    return groups


def pool_padded(hidden: torch.Tensor, mask: list[int], span: tuple[int, int]) -> torch.Tensor:
    """Pool the hidden states [hi - lo, hidden] of the unpadded span at their positions in the padded input."""
    full = torch.zeros(len(mask), hidden.shape[-1])
    full[span[0] : span[1]] = hidden
    return position_weighted_mean(full, torch.tensor(mask))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """RTP-LLM returns SGPT embeddings with unit L2 norm (sentence-transformers leaves them unnormalised)."""
    return F.normalize(x, dim=-1)


def sgpt_input_ids(tokenizer: Any, text: str, is_query: bool, case_sensitive: bool, max_len: int) -> list[int]:
    """RTP-LLM's sgpt_bloom_vector input: the text lowercased (unless ``case_sensitive``), tokenized and truncated
    to ``max_len - 2``, then wrapped in the single-token brackets ``[`` ``]`` (query) or ``{`` ``}`` (document).
    The brackets are inserted as ids, not text, so that they cannot merge with neighbouring characters."""
    text = text if case_sensitive else text.lower()
    ids = list(tokenizer(text, truncation=True, max_length=max_len - 2)["input_ids"])
    open_, close = ("[", "]") if is_query else ("{", "}")
    return [_single_token(tokenizer, open_), *ids, _single_token(tokenizer, close)]


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidRequest(f"the tokenizer has no token for the SGPT bracket {text!r}")
    return int(ids[0])


def sentence_transformers_pooling(ckpt_path: str) -> str | None:
    """The pooling mode a sentence-transformers checkpoint declares (``1_Pooling/config.json``), or None."""
    modules = Path(ckpt_path) / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text()):
        if module.get("type", "").endswith("models.Pooling"):
            config = json.loads((Path(ckpt_path) / module.get("path", "") / "config.json").read_text())
            modes = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
            return ",".join(sorted(modes))
    return None
