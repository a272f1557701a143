"""The CPU backend's whole-stack decode op: every layer of a plain pre-norm decoder in one C++ call per step.

At batch 1 on these 2-core machines the module tree's Python and dispatch cost (~200 us per layer: ~30 module
calls and ~25 ops) exceeds the layer's own maths once the weights are int8 or fp16, so ``CpuDecodeStack`` hands a
step of decodes only to ``torch.ops.rtp_mm_cpu.decode_layers`` (rtp_mm/kernels/cpu/kernels.cpp), which runs the same
ops as the modules (RMSNorm, fused q/k/v, NeoX rotary, paged attention, o, residual, gated silu MLP) in C++. Any
other step (prefill chunks, more than KERNEL_MAX_ROWS rows, Qwen logn scaling) returns None and runs the modules.

It applies to a model whose every layer is the llama shape: RMSNorm with float32 weights, no parallel or DeepNorm
residual, NeoX rotary over the whole head, gated silu MLP, int8 or fp16 weight-only projections, one rank.
``CpuDecodeStack.refusal`` says why a model is not. The projections are captured at start-up; a later change of the
module tree (LoRA adapters wrap every projection) is seen by identity on every call and turns the stack off.
"""

from __future__ import annotations

import torch
from torch import nn

from rtp_mm.kernels import cpu
from rtp_mm.kernels.attention import KVCache
from rtp_mm.kernels.linear import HalfWeightLinear, Int8WeightLinear
from rtp_mm.llm.models.decoder import Decoder, DecoderLayer, RMSNorm, StepContext

_EMPTY = torch.empty(0)


def _projection(linear: nn.Module) -> list[torch.Tensor]:
    """(weight, scale, bias) of one projection, absent ones as empty tensors (kernels.cpp's LAYER_FIELDS order)."""
    bias = _EMPTY if linear.bias is None else linear.bias.detach().float().contiguous()
    scale = linear.scale if isinstance(linear, Int8WeightLinear) else _EMPTY
    return [linear.weight, scale, bias]


class CpuDecodeStack:
    def __init__(self, model: Decoder):
        spec = model.spec
        self.model = model
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = model.layers[0].attn.scale
        self.eps = spec.norm_eps
        self.captured = [self._modules(layer) for layer in model.layers]
        self.weights: list[torch.Tensor] = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            self.weights += [layer.input_norm.weight, *_projection(attn.qkv), *_projection(attn.o)]
            self.weights += [layer.post_norm.weight, *_projection(mlp.gate_up), *_projection(mlp.down)]

    @staticmethod
    def _modules(layer: DecoderLayer) -> tuple[nn.Module, ...]:
        return (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)

    @staticmethod
    def refusal(model: Decoder) -> str | None:
        """None when every layer has the shape decode_layers computes, else what differs."""
        spec, rotary = model.spec, model.rotary
        if model.tp is not None:
            return "tensor parallel"
        if spec.norm != "rms" or spec.parallel_residual or spec.norm_residual_alpha or spec.shared_input_norm:
            return "not a pre-RMSNorm residual block"
        if not spec.gated_mlp or spec.activation != "silu":
            return "not a gated silu MLP"
        if rotary is None or rotary.spec.two_d or rotary.spec.interleaved or rotary.dim != spec.head_dim:
            return "not NeoX rotary over the whole head"
        if spec.logn_max_position or spec.prefix_lm is not None:
            return "logn or prefix-LM attention"
        for layer in model.layers:
            norms = (layer.input_norm, layer.post_norm)
            if not all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 for n in norms):
                return "norm weights not float32"
            for linear in CpuDecodeStack._modules(layer):
                half = isinstance(linear, HalfWeightLinear) and linear.weight.dtype == torch.float16
                if not (half or type(linear) is Int8WeightLinear):
                    return "projections are not 8- or 16-bit weight-only layers"
        return None

    def __call__(self, h: torch.Tensor, ctx: StepContext, caches: list) -> torch.Tensor | None:
        meta, rows = ctx.meta, h.shape[0]
        if meta.prefills or meta.num_decode_tokens != rows or rows > cpu.KERNEL_MAX_ROWS or h.dtype != torch.float32:
            return None
        if ctx.logn is not None or ctx.alibi_slopes is not None or ctx.cos.shape[-1] != self.head_dim:
            return None
        if type(caches[0]) is not KVCache or caches[0].k.dtype != torch.float32:
            return None
        layers = self.model.layers
        if any(self._modules(layer) != captured for layer, captured in zip(layers, self.captured, strict=True)):
            return None
        return cpu.ops().decode_layers(
            h,
            self.weights,
            [c.k for c in caches],
            [c.v for c in caches],
            ctx.cos.contiguous(),
            ctx.sin.contiguous(),
            meta.slot_mapping,
            meta.decode_block_tables.contiguous(),
            meta.decode_context_lens.contiguous(),
            self.num_heads,
            self.num_kv_heads,
            self.scale,
            self.eps,
            meta.first_key,
        )
