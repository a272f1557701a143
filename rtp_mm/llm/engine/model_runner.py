"""ModelRunner: owns the model, the device and the KV-cache tensors; turns a frozen ScheduledBatch into tensors,
runs the model and samples the next token of every sequence that reached its last known token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from rtp_mm.kernels.attention import AttnMetadata, Int8KVCache, KVCache, PrefillChunk, causal_mask, decode_mask
from rtp_mm.llm.engine.cuda_graphs import DecodeGraphs
from rtp_mm.llm.engine.embedding import prefill_hidden
from rtp_mm.llm.engine.kv_prefix import KVPrefix
from rtp_mm.llm.engine.rejection import verify
from rtp_mm.llm.engine.sampler import sample
from rtp_mm.llm.engine.scheduler import ScheduledBatch, ScheduledSeq
from rtp_mm.llm.lora.manager import LoraManager
from rtp_mm.llm.models.decoder import Decoder


def kv_block_bytes(model: Decoder, block_size: int, kv_dtype: torch.dtype, int8_kv: bool = False) -> int:
    """Bytes of one KV block over all layers (K and V). With ``int8_kv`` each (token, kv-head) holds head_dim int8
    values plus one float32 scale, whatever ``kv_dtype`` is."""
    spec = model.spec
    if int8_kv:
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * (spec.head_dim + 4)
    itemsize = torch.empty(0, dtype=kv_dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


# Prompt logprobs turn at most this many rows into full-vocabulary logits at once (a 2048-token chunk of a 152k
# vocabulary would be 1.2 GB of float32): only each row's chosen-token logprob and top-N survive a slice.
PROMPT_LOGITS_ROWS = 256


@dataclass(frozen=True)
class SampledToken:
    """One sequence's new token (and its top-N logprobs, and its raw logits for return_logits, when asked for)."""

    request_id: int
    token: int
    logprobs: dict[int, float] | None
    logits: list[float] | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprob entries of prompt positions [first_position, first_position + len(entries)) of one request: each the
    logprob of the prompt's own token at that position plus the top-N alternatives (see Request.prompt_logprobs)."""

    request_id: int
    first_position: int
    entries: list[dict[int, float]]


@dataclass(frozen=True)
class StepOutput:
    """What one step computed: the new token of every sampled sequence, in batch order, and prompt logprobs."""

    tokens: list[SampledToken]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


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
    prompt_rows: tuple[tuple[int, ScheduledSeq], ...] = ()  # (first row, seq) of sequences wanting prompt logprobs


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
        self.kv_prefix: KVPrefix | None = None  # P-tuning v2: blocks every sequence attends to first (kv_prefix.py)
        # Tensor parallelism, rank 0: sends each unit of model work to the shard workers before running it here, so
        # that every rank enters the same collectives (llm/engine/tp.py). None on one rank and on the workers.
        self.announce: Callable[[tuple[Any, ...]], None] | None = None
        self.lora: LoraManager | None = None  # LoRA adapters: each forward applies its sequences' adapters (llm/lora)
        # Decode CUDA graphs (PRE_ALLOCATE_OP_MEM on CUDA, cuda_graphs.py) and the KV block their pad rows use.
        self.graphs: DecodeGraphs | None = None
        self.pad_block: int | None = None
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
        prompt_rows: list[tuple[int, ScheduledSeq]] = []
        for seq in batch.seqs:
            row0 = len(ids)
            if seq.prompt_targets:
                prompt_rows.append((row0, seq))
            end = seq.start + seq.num_new_tokens
            ids.extend(seq.token_ids)
            positions.extend(seq.positions)
            # A proposed token's row sees the length plain decoding would give it (dynamic rope, logn).
            proposed = len(seq.proposal) if seq.proposal is not None else 0
            known = end - proposed
            seq_lens.extend([known] * (seq.num_new_tokens - proposed) + list(range(known + 1, end + 1)))
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
                sample_rows.extend(range(len(ids) - 1 - proposed, len(ids)))  # speculative: every row verifies
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
        if self.kv_prefix is not None:
            meta = self.kv_prefix.attn_metadata(meta)
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
            prompt_rows=tuple(prompt_rows),
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run one step: the new token of every sampled sequence, in batch order, and the prompt logprobs of the
        prompt rows that asked for them (from the same forward pass)."""
        hidden, inputs = self.hidden_states(batch)
        prompt = [self._prompt_logprobs(hidden, row0, seq) for row0, seq in inputs.prompt_rows]
        sampled = inputs.sampled
        if not sampled:
            return StepOutput([], prompt)
        logits = self.model.compute_logits(hidden[inputs.sample_index])
        if any(seq.proposal is not None for seq in sampled):  # speculative decoding (rejection.py)
            return StepOutput([SampledToken(*emitted) for emitted in verify(logits, sampled)], prompt)
        tokens, logprobs = sample(logits, [seq.sampling for seq in sampled])
        return StepOutput(
            [
                SampledToken(seq.request_id, token, lp, _selected_logits(logits[i], seq.logits_select))
                for i, (seq, token, lp) in enumerate(zip(sampled, tokens, logprobs, strict=True))
            ],
            prompt,
        )

    def _prompt_logprobs(self, hidden: torch.Tensor, row0: int, seq: ScheduledSeq) -> PromptLogprobs:
        """Log-softmax of the rows that predict ``seq.prompt_targets``, a slice of rows at a time; only the target's
        logprob and the top-N of each row are kept."""
        targets = torch.tensor(seq.prompt_targets, dtype=torch.long, device=self.device)
        entries: list[dict[int, float]] = []
        for lo, logits in self._prompt_logit_slices(hidden, row0, seq):
            logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab] float32
            chosen = logprobs.gather(1, targets[lo : lo + len(logits), None]).squeeze(1).tolist()
            if seq.prompt_top_n:
                top = torch.topk(logprobs, seq.prompt_top_n, dim=-1)
                indices, values = top.indices.tolist(), top.values.tolist()
                tops = [dict(zip(i, v, strict=True)) for i, v in zip(indices, values, strict=True)]
            else:
                tops = [{} for _ in chosen]
            for entry, target, lp in zip(tops, seq.prompt_targets[lo:], chosen, strict=False):
                entry[target] = lp
                entries.append(entry)
        return PromptLogprobs(seq.request_id, seq.start + 1, entries)

    def _prompt_logit_slices(self, hidden: torch.Tensor, row0: int, seq: ScheduledSeq) -> Iterator[tuple[int, Any]]:
        """(first target index, logits [rows, vocab]) of ``seq``'s prompt rows, PROMPT_LOGITS_ROWS at a time."""
        n = len(seq.prompt_targets)
        for lo in range(0, n, PROMPT_LOGITS_ROWS):
            yield lo, self.model.compute_logits(hidden[row0 + lo : row0 + min(lo + PROMPT_LOGITS_ROWS, n)])

    @torch.inference_mode()
    def run_shard(self, batch: ScheduledBatch) -> None:
        """A tensor-parallel worker's part of ``execute``: the same forward and the same head calls (whose
        collectives rank 0 enters in the same order), without sampling, which happens once, on rank 0."""
        hidden, inputs = self.hidden_states(batch)
        for row0, seq in inputs.prompt_rows:
            for _ in self._prompt_logit_slices(hidden, row0, seq):
                pass
        if inputs.sampled:
            self.model.compute_logits(hidden[inputs.sample_index])

    def prefill_hidden(self, token_lists: list[list[int]]) -> list[torch.Tensor]:
        """Final-norm hidden states of whole prompts, outside any step (embeddings, ``embedding.prefill_hidden``)."""
        if self.announce is not None:
            self.announce(("hidden", token_lists))
        return prefill_hidden(self.model, token_lists, self.block_size)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, tuple[ScheduledSeq, ...]]:
        """The model on one step. Returns float32 logits [num_sampled, vocab] and the sequences they belong to."""
        hidden, inputs = self.hidden_states(batch)
        return self.model.compute_logits(hidden[inputs.sample_index]), inputs.sampled

    @torch.inference_mode()
    def hidden_states(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepInputs]:
        """Final-norm hidden states [num_tokens, hidden] of every token of the step (image rows spliced over their
        placeholders' embeddings), and the step's inputs."""
        if self.announce is not None:
            self.announce(("step", batch))
        inputs = self.prepare(batch)
        embeds = None
        if inputs.mm_rows:
            # Placeholder ids inside image spans may be out of vocabulary (llava uses -200): embed a valid id.
            safe_ids = inputs.input_ids.clamp(0, self.model.spec.vocab_size - 1)
            embeds = self.model.embed_tokens(safe_ids)
            for row, rows in inputs.mm_rows:
                embeds[row : row + rows.shape[0]] = rows.to(embeds.dtype)
        hidden = self.graphs.run(batch, inputs) if self.graphs is not None and embeds is None else None
        if hidden is not None:
            return hidden, inputs
        with self.lora.step(batch.seqs) if self.lora is not None else nullcontext():
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


def _selected_logits(row: torch.Tensor, select: tuple[int, ...] | None) -> list[float] | None:
    """return_logits: the raw logits row [vocab] at ``select`` (the whole row when empty), or None when not asked."""
    if select is None:
        return None
    return (row[list(select)] if select else row).tolist()
