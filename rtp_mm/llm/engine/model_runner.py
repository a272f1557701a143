"""ModelRunner: owns the model, the device and the KV-cache tensors; turns a frozen ScheduledBatch into tensors,
runs the model and samples the next token of every sequence that reached its last known token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtp_mm.kernels.attention import AttnMetadata, Int8KVCache, KVCache, PrefillChunk, causal_mask, decode_mask
from rtp_mm.llm.engine.sampler import sample
from rtp_mm.llm.engine.scheduler import ScheduledBatch, ScheduledSeq
from rtp_mm.llm.models.decoder import Decoder


def kv_block_bytes(model: Decoder, block_size: int, kv_dtype: torch.dtype, int8_kv: bool = False) -> int:
    """Bytes of one KV block over all layers (K and V). With ``int8_kv`` each (token, kv-head) holds head_dim int8
    values plus one float32 scale, whatever ``kv_dtype`` is."""
    spec = model.spec
    if int8_kv:
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * (spec.head_dim + 4)
    itemsize = torch.empty(0, dtype=kv_dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


@dataclass(frozen=True)
class SampledToken:
    """One sequence's new token (and its top-N logprobs when asked for)."""

    request_id: int
    token: int
    logprobs: dict[int, float] | None


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    seq_lens: torch.Tensor  # [tokens] sequence length after this step, per token (dynamic rope)
    meta: AttnMetadata
    sample_index: torch.Tensor  # [num_sampled] rows of the hidden states to turn into logits
    sampled: tuple[ScheduledSeq, ...]  # the sequences those rows belong to, same order
    mm_rows: tuple[tuple[int, torch.Tensor], ...]  # (first flattened row, embeds) spliced over token embeddings
    prompt_lens: torch.Tensor | None = None  # [tokens] prompt length of each token's request (Qwen v1 NTK)


class ModelRunner:
    """Invariant: ``caches[l]`` holds layer l's K/V as [num_blocks, block_size, kv_heads, head_dim] (``int8_kv``:
    int8 values plus a float32 scale per token and kv-head, see Int8KVCache)."""

    def __init__(
        self,
        model: Decoder,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype | None = None,
        int8_kv: bool = False,
    ):
        self.model = model
        self.device = model.norm.weight.device
        self.dtype = model.act_dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        spec = model.spec
        kv_dtype = kv_dtype or self.dtype
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.caches: list[KVCache | Int8KVCache]
        if int8_kv:
            self.caches = [Int8KVCache.empty(*shape, device=self.device) for _ in range(spec.num_layers)]
        else:
            self.caches = [
                KVCache(
                    torch.zeros(shape, dtype=kv_dtype, device=self.device),
                    torch.zeros(shape, dtype=kv_dtype, device=self.device),
                )
                for _ in range(spec.num_layers)
            ]

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list = []
        seq_lens: list[int] = []
        prompt_lens: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledSeq] = []
        prefills: list[PrefillChunk] = []
        mm_rows: list[tuple[int, torch.Tensor]] = []
        for seq in batch.seqs:
            row0 = len(ids)
            end = seq.start + seq.num_new_tokens
            ids.extend(seq.token_ids)
            positions.extend(seq.positions)
            seq_lens.extend([end] * seq.num_new_tokens)
            prompt_lens.extend([seq.prompt_len] * seq.num_new_tokens)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(seq.start, end))
            if seq.num_new_tokens > 1:
                prefills.append(
                    PrefillChunk(
                        q_start=row0,
                        q_len=seq.num_new_tokens,
                        start_pos=seq.start,
                        block_table=torch.tensor(table, dtype=torch.long, device=self.device),
                        bidirectional_len=seq.bidirectional_len,
                        # built once per step, shared by every layer
                        mask=causal_mask(seq.start, seq.num_new_tokens, seq.bidirectional_len, device=self.device)
                        if seq.start
                        else None,
                    )
                )
            for mm in seq.mm_inputs:
                lo, hi = max(mm.offset, seq.start), min(mm.offset + mm.embeds.shape[0], end)
                if lo < hi:
                    mm_rows.append((row0 + lo - seq.start, mm.embeds[lo - mm.offset : hi - mm.offset]))
            if seq.sample:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
        decodes = batch.decodes
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            tables = [list(s.block_table) + [0] * (width - len(s.block_table)) for s in decodes]
            decode_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
            context = [s.start + 1 for s in decodes]
            decode_lens = torch.tensor(context, dtype=torch.long, device=self.device)
            mask = decode_mask(decode_lens, width * bs)
        else:
            decode_tables, decode_lens, context, mask = None, None, [0], None
        meta = AttnMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            decode_max_context=max(context),
            decode_mask=mask,
            prefills=tuple(prefills),
            block_size=bs,
        )
        dev = self.device
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            meta=meta,
            sample_index=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            sampled=tuple(sampled),
            mm_rows=tuple(mm_rows),
            prompt_lens=torch.tensor(prompt_lens, dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        """Run one step; the new token of every sampled sequence, in batch order."""
        logits, sampled = self.forward(batch)
        if not sampled:
            return []
        tokens, logprobs = sample(logits, [seq.sampling for seq in sampled])
        return [
            SampledToken(seq.request_id, token, lp) for seq, token, lp in zip(sampled, tokens, logprobs, strict=True)
        ]

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, tuple[ScheduledSeq, ...]]:
        """The model on one step. Returns float32 logits [num_sampled, vocab] and the sequences they belong to."""
        hidden, inputs = self.hidden_states(batch)
        return self.model.compute_logits(hidden[inputs.sample_index]), inputs.sampled

    @torch.inference_mode()
    def hidden_states(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepInputs]:
        """Final-norm hidden states [num_tokens, hidden] of every token of the step (image rows spliced over their
        placeholders' embeddings), and the step's inputs."""
        inputs = self.prepare(batch)
        embeds = None
        if inputs.mm_rows:
            # Placeholder ids inside image spans may be out of vocabulary (llava uses -200): embed a valid id.
            safe_ids = inputs.input_ids.clamp(0, self.model.spec.vocab_size - 1)
            embeds = self.model.embed_tokens(safe_ids)
            for row, rows in inputs.mm_rows:
                embeds[row : row + rows.shape[0]] = rows.to(embeds.dtype)
        hidden = self.model(
            inputs.input_ids,
            inputs.positions,
            inputs.meta,
            self.caches,
            seq_lens=inputs.seq_lens,
            inputs_embeds=embeds,
            prompt_lens=inputs.prompt_lens,
        )
        return hidden, inputs
