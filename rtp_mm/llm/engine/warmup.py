"""PRE_ALLOCATE_OP_MEM: one forward at the largest per-step token budget before the KV cache is sized.

On CUDA the activation buffers it allocates stay in torch's caching allocator, so the free memory measured afterwards
(and given to KV blocks) already accounts for them; on CPU it initialises the matmul/attention kernels (first-call
dispatch and scratch buffers), which moves that cost out of the first user request's time to first token.
"""

from __future__ import annotations

import time

import torch

from rtp_mm.kernels.attention import AttnMetadata, KVCache, PrefillChunk
from rtp_mm.llm.models.decoder import Decoder


@torch.inference_mode()
def warm_up(model: Decoder, num_tokens: int, block_size: int) -> float:
    """Run a prefill of ``num_tokens`` tokens (and a one-token decode) on scratch KV blocks. Returns seconds spent."""
    start = time.perf_counter()
    spec = model.spec
    device, dtype = model.norm.weight.device, model.act_dtype
    num_blocks = -(-(num_tokens + 1) // block_size)
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    caches = [
        KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]
    table = torch.arange(num_blocks, device=device)
    positions = torch.arange(num_tokens, device=device)
    prefill = AttnMetadata(
        slot_mapping=positions,
        num_decode_tokens=0,
        decode_block_tables=None,
        decode_context_lens=None,
        decode_max_context=0,
        decode_mask=None,
        prefills=(PrefillChunk(q_start=0, q_len=num_tokens, start_pos=0, block_table=table),),
        block_size=block_size,
    )
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    hidden = model(ids, positions, prefill, caches, seq_lens=torch.full_like(positions, num_tokens))
    model.compute_logits(hidden[-1:])
    decode = AttnMetadata(
        slot_mapping=torch.tensor([num_tokens], device=device),
        num_decode_tokens=1,
        decode_block_tables=table[None],
        decode_context_lens=torch.tensor([num_tokens + 1], device=device),
        decode_max_context=num_tokens + 1,
        decode_mask=None,
        prefills=(),
        block_size=block_size,
    )
    pos = torch.tensor([num_tokens], device=device)
    model.compute_logits(model(ids[:1], pos, decode, caches, seq_lens=pos + 1))
    del caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
