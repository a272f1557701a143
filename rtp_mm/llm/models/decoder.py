"""The one configurable decoder. Every text family is a ``DecoderSpec`` plus a weight-name table.

The model works on a flattened batch: ``input_ids``/``positions`` are [num_tokens] over all sequences of the step and
attention finds each sequence's context through ``AttnMetadata``. Internal parameter names (``layers.{i}.attn.qkv``,
``layers.{i}.mlp.gate_up`` ...) are what the family weight tables map checkpoint names onto.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtp_mm.kernels.attention import AttnMetadata, KVCache, paged_attention
from rtp_mm.kernels.collectives import TPGroup
from rtp_mm.kernels.linear import half_weight_linear, int8_weight_linear
from rtp_mm.llm.models.prefix_lm import PrefixLM
from rtp_mm.llm.models.rope import RopeSpec, RotaryEmbedding


@dataclass(frozen=True)
class DecoderSpec:
    """Architecture of one checkpoint. A family difference that is a constant, flag or shape lives here."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: str = "rms"  # rms | layer
    norm_eps: float = 1e-6
    norm_bias: bool = False  # LayerNorm with bias
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    gated_mlp: bool = True  # act(gate(x)) * up(x) -> down
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    position: str = "rope"  # rope | alibi | learned | none
    rope: RopeSpec = field(default_factory=RopeSpec)
    max_position_embeddings: int = 2048  # table size for learned positions
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)
    shared_input_norm: bool = False  # parallel block with one norm for attention and MLP
    embedding_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    embedding_norm: bool = False  # BLOOM's LayerNorm right after the embedding
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    logn_max_position: int = 0  # Qwen v1 logn attention: > 0 scales queries beyond this length
    default_max_seq_len: int = 2048  # used when MAX_SEQ_LEN is 0
    # GLM v1/130B DeepNorm-style residual: x = alpha * norm(x) + sublayer(norm(x)); 0 = the usual x + sublayer(...)
    norm_residual_alpha: float = 0.0
    prefix_lm: PrefixLM | None = None  # GLM v1/130B: bidirectional prompt up to <sop>, GLM positions (prefix_lm.py)
    extra: dict = field(default_factory=dict, compare=False)  # family-specific facts (e.g. EOS ids)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def make_norm(spec: DecoderSpec) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.norm_bias)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fp32_op = rms_norm_fp32  # the kernel backend's op (transforms.use_cpu_kernels swaps it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return self.fp32_op(x, self.weight, self.eps)  # same result as below in fp32
        # Normalise in float32 like the reference implementations, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def gated_activation(act: Callable, h: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of h = [gate | up] along the last dim."""
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (non-power-of-two head counts interleave the next power's slopes)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (i + 1) for i in range(0, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")


def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


class Attention(nn.Module):
    """``spec`` is this rank's (its heads); under tensor parallelism ``reduce`` sums the row-parallel ``o``."""

    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding | None, reduce: Callable = _no_reduce):
        super().__init__()
        self.spec = spec
        self.reduce = reduce
        self.qkv = nn.Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.qkv_bias)
        self.o = nn.Linear(spec.q_size, spec.hidden_size, bias=spec.o_bias)
        self.rotary = rotary
        self.scale = spec.attn_scale if spec.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim)
        self.attend = paged_attention  # the kernel backend's op (transforms.use_triton_kernels swaps it)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache) -> torch.Tensor:
        spec = self.spec
        qkv = self.qkv(x).view(-1, spec.num_heads + 2 * spec.num_kv_heads, spec.head_dim)
        qk, v = qkv.split([spec.num_heads + spec.num_kv_heads, spec.num_kv_heads], dim=1)
        if self.rotary is not None:
            qk = self.rotary.apply(qk, ctx.cos, ctx.sin)  # q and k heads rotated in one pass
        q, k = qk.split([spec.num_heads, spec.num_kv_heads], dim=1)
        if ctx.logn is not None:
            q = q * ctx.logn[:, None, None].to(q.dtype)
        out = self.attend(q, k, v, cache, ctx.meta, self.scale, ctx.alibi_slopes)
        return self.reduce(self.o(out.reshape(-1, spec.q_size)))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, reduce: Callable = _no_reduce):
        super().__init__()
        self.reduce = reduce
        self.gated = spec.gated_mlp
        if spec.gated_mlp:
            self.gate_up = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias)
        else:
            self.up = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = _ACTIVATIONS[spec.activation]
        # The kernel backend's op for act(gate) * up (transforms.use_cpu_kernels swaps it for a fused silu one).
        self.act_mul = functools.partial(gated_activation, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.reduce(self.down(self.act_mul(self.gate_up(x))))
        return self.reduce(self.down(self.act(self.up(x))))


@dataclass
class StepContext:
    """Per-step tensors shared by all layers (computed once per forward)."""

    meta: AttnMetadata
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    logn: torch.Tensor | None = None  # [tokens] query scale (Qwen v1)
    alibi_slopes: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, rotary: RotaryEmbedding | None, reduce: Callable = _no_reduce):
        super().__init__()
        self.spec = spec
        self.input_norm = make_norm(spec)
        self.attn = Attention(spec, rotary, reduce)
        if not spec.shared_input_norm:
            self.post_norm = make_norm(spec)
        self.mlp = MLP(spec, reduce)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache) -> torch.Tensor:
        h = self.input_norm(x)
        attn_out = self.attn(h, ctx, cache)
        if self.spec.norm_residual_alpha:
            alpha = self.spec.norm_residual_alpha
            h = self.post_norm(h * alpha + attn_out)
            return h * alpha + self.mlp(h)
        if self.spec.parallel_residual:
            mlp_in = h if self.spec.shared_input_norm else self.post_norm(x)
            return x + attn_out + self.mlp(mlp_in)
        x = x + attn_out
        return x + self.mlp(self.post_norm(x))


class Decoder(nn.Module):
    """Embedding -> N decoder layers -> final norm -> LM head, over a flattened batch.

    Under tensor parallelism (``tp`` and ``shard``, see sharding.py) ``spec`` is this rank's: its heads, kv heads
    and intermediate rows, the model's vocabulary size; with a vocab split the embedding and head hold this rank's
    ``shard.vocab_rows`` rows from ``shard.vocab_start``.
    """

    def __init__(self, spec: DecoderSpec, tp: TPGroup | None = None, shard: Any = None):  # sharding.Shard
        super().__init__()
        self.spec = spec
        self.tp = tp
        self.vocab_start = 0
        self.vocab_split = shard is not None and shard.split_vocab
        if self.vocab_split:
            self.vocab_start = shard.vocab_start
        self.vocab_rows = shard.vocab_rows if self.vocab_split else spec.vocab_size
        vocab_rows = self.vocab_rows
        reduce = tp.all_reduce if tp is not None else _no_reduce
        self.embed = nn.Embedding(vocab_rows, spec.hidden_size)
        if spec.position == "learned":
            self.pos_embed = nn.Embedding(spec.max_position_embeddings, spec.hidden_size)
        if spec.embedding_norm:
            self.embed_norm = make_norm(spec)
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim) if spec.position == "rope" else None
        self.layers = nn.ModuleList(DecoderLayer(spec, self.rotary, reduce) for _ in range(spec.num_layers))
        self.norm = make_norm(spec)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, vocab_rows, bias=spec.lm_head_bias)
        self.tied_head: nn.Module | None = None  # set by weight transforms that need their own head copy
        # A kernel backend's op over all layers at once for the steps it handles (returns None for the others), set
        # by transforms.use_cpu_kernels (llm/models/cpu_layers.py).
        self.layer_stack: Callable[[torch.Tensor, StepContext, list[KVCache]], torch.Tensor | None] | None = None
        # Plain attribute (the model is built on the meta device; these slopes must stay real). A rank's heads take
        # their slopes from the model's list.
        self.alibi = None
        if spec.position == "alibi":
            self.alibi = alibi_slopes(shard.full.num_heads if shard else spec.num_heads)
            self.alibi = shard.alibi_slice(self.alibi) if shard else self.alibi

    @property
    def act_dtype(self) -> torch.dtype:
        """Activation dtype: the final norm's (weight-storage transforms leave norms alone)."""
        return self.norm.weight.dtype

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_split:
            # Vocab-parallel lookup: rows of other ranks' ids are zeros here, and the sum over ranks is the lookup.
            local = input_ids - self.vocab_start
            mine = (local >= 0) & (local < self.vocab_rows)
            h = self.embed(torch.where(mine, local, 0)).to(self.act_dtype) * mine[:, None].to(self.act_dtype)
            h = self.tp.all_reduce(h)
        else:
            h = self.embed(input_ids).to(self.act_dtype)
        if self.spec.embedding_scale != 1.0:
            # Gemma: the scale is rounded to the model dtype first, as the reference does.
            h = h * torch.tensor(self.spec.embedding_scale, dtype=h.dtype)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        meta: AttnMetadata,
        caches: list[KVCache],
        seq_lens: torch.Tensor | None = None,  # [tokens] each token's sequence length after this step
        inputs_embeds: torch.Tensor | None = None,  # [tokens, hidden] replaces the embedding lookup
        prompt_lens: torch.Tensor | None = None,  # [tokens] each token's prompt length (Qwen v1 dynamic NTK)
    ) -> torch.Tensor:  # [tokens, hidden] after the final norm
        spec = self.spec
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if spec.position == "learned":
            h = h + self.pos_embed(positions)
        if spec.embedding_norm:
            h = self.embed_norm(h)
        ctx = StepContext(meta=meta)
        if self.rotary is not None:
            ctx.cos, ctx.sin = self.rotary.cos_sin(positions, seq_lens, for_dtype=h.dtype, prompt_lens=prompt_lens)
        if self.alibi is not None:
            if self.alibi.device != h.device:
                self.alibi = self.alibi.to(h.device)
            ctx.alibi_slopes = self.alibi
        if spec.logn_max_position and seq_lens is not None:
            # Qwen v1: queries at position p >= seq_length are scaled by log_{seq_length}(p + 1).
            pos1 = (positions + 1).to(torch.float32)
            ctx.logn = torch.where(
                pos1 > spec.logn_max_position, torch.log(pos1) / math.log(spec.logn_max_position), 1.0
            )
        stacked = self.layer_stack(h, ctx, caches) if self.layer_stack is not None else None
        if stacked is not None:
            return self.norm(stacked)
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer(h, ctx, cache)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        logits = self._head(hidden)
        if not self.vocab_split:
            return logits
        # Vocab-parallel head: every rank's rows, in rank order, without the last rank's padding.
        return self.tp.all_gather_last(logits)[:, : self.spec.vocab_size]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.spec.tie_word_embeddings:
            return self.lm_head(hidden).float()
        if self.tied_head is not None:  # a kernel-specific copy of the tied table (see llm/models/packing.py)
            return self.tied_head(hidden).float()
        weight = self.embed.weight
        if weight.dtype == torch.int8:  # int8 weight storage: the table's per-row scales are the head's per channel
            return int8_weight_linear(hidden, weight, self.embed.scale).float()
        if weight.dtype != hidden.dtype:  # half-precision weight storage
            return half_weight_linear(hidden, weight).float()
        return F.linear(hidden, weight).float()
