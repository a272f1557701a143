"""Transformations applied to a built model (gpt-fast style): they never branch inside the decoder's maths."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rtp_mm.kernels.linear import HalfWeightLinear, Int8WeightEmbedding, Int8WeightLinear
from rtp_mm.llm.models.cpu_layers import CpuDecodeStack
from rtp_mm.llm.models.decoder import MLP, Decoder, RMSNorm


def use_half_weights(model: Decoder, weight_dtype: torch.dtype = torch.float16) -> Decoder:
    """Store every projection, the embedding and the LM head in ``weight_dtype``; activations, norms and the KV
    cache keep the model's float32 dtype. Halves weight memory and, on CPU, speeds up small-batch decoding (see
    ``rtp_mm.kernels.linear``)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, HalfWeightLinear(child, weight_dtype))
    model.embed.weight = nn.Parameter(model.embed.weight.detach().to(weight_dtype), requires_grad=False)
    return model


def quantize_int8_weights(model: Decoder, quantize_embedding: bool = True) -> Decoder:
    """WEIGHT_TYPE=INT8, in place: every nn.Linear (projections and an untied LM head) becomes an Int8WeightLinear
    (symmetric per-output-channel int8, quantized here, so any checkpoint format works). Norms, biases, learned
    position embeddings and the KV cache keep the activation dtype, and so do all activations.

    The token embedding becomes an Int8WeightEmbedding (rows dequantized to the activation dtype on lookup) unless
    ``quantize_embedding`` is False. It is the largest matrix of small models and, when tied, also the LM head:
    SmolLM2-135M's table is 21% of its weights, so a float32 table would leave the model at 0.41x its fp32 bytes
    instead of 0.25x, and its int8 head projection runs ~2x faster on CPU than the fp32 one
    (``rtp_mm.kernels.linear``). Decoder.compute_logits projects a tied head with the int8 table directly.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8WeightLinear(child))
    if quantize_embedding:
        model.embed = Int8WeightEmbedding(model.embed)
    return model


def use_triton_kernels(model: Decoder) -> str:
    """The Triton backend (``rtp_mm.kernels.triton``, chosen once at start-up on CUDA): paged attention (decode and
    prefill chunks, fp16/bf16/fp32 and INT8 KV), the INT8 weight-only GEMM and the rotary variants (NeoX,
    interleaved, partial, GLM 2D), behind the same op signatures as the torch reference ops they replace. Returns
    what it swapped, for the start-up log."""
    from rtp_mm.kernels.triton.int8_linear import int8_weight_linear
    from rtp_mm.kernels.triton.paged_attention import paged_attention
    from rtp_mm.kernels.triton.rotary import apply_rotary

    swapped = {"paged attention"}
    for module in model.modules():
        if hasattr(module, "attend"):
            module.attend = paged_attention
        if isinstance(module, Int8WeightLinear):
            module.matmul = int8_weight_linear
            swapped.add("int8 GEMM")
    model.layer_stack = None  # a CPU backend's whole-stack op (tests swap backends on one model)
    rotary = model.rotary
    if rotary is not None:
        spec = rotary.spec
        rotary.apply = lambda x, cos, sin: apply_rotary(x, cos, sin, rotary.dim, spec.interleaved, spec.two_d)
        swapped.add("rotary")
    return "triton " + " + ".join(sorted(swapped))


class TiedHead(nn.Module):
    """A tied LM head that projects with the embedding table itself (no copy) through a kernel backend's op."""

    def __init__(self, matmul: Callable, weight: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__()
        self.matmul, self.weight, self.scale = matmul, weight, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.matmul(x, self.weight)
        return self.matmul(x, self.weight, self.scale)


def use_cpu_kernels(model: Decoder) -> str:
    """The CPU backend (``rtp_mm.kernels.cpu``, chosen once at start-up on a CPU with AVX2 where the kernels build):
    weight-only GEMVs for int8 / fp16 weights, RMSNorm, NeoX rotary, silu(gate) * up and paged decode attention,
    behind the same op signatures as the torch ops they replace (each hands inputs outside its contract back to its
    reference). Returns what it swapped, for the start-up log, or why the torch ops stay."""
    from rtp_mm.kernels import cpu

    reason = cpu.unavailable_reason()
    if reason is not None:
        return f"torch ops (CPU kernels unavailable: {reason})"
    swapped = {"decode attention"}
    for module in model.modules():
        if hasattr(module, "attend"):
            module.attend = cpu.paged_attention
        if isinstance(module, Int8WeightLinear):
            module.matmul = cpu.int8_weight_linear
            swapped.add(f"int8 GEMM up to {cpu.KERNEL_MAX_ROWS} rows")
        if isinstance(module, HalfWeightLinear):
            module.matmul = cpu.half_weight_linear
            swapped.add(f"fp16 GEMM up to {cpu.KERNEL_MAX_ROWS} rows")
        if isinstance(module, RMSNorm):
            module.fp32_op = cpu.rms_norm
            swapped.add("RMSNorm")
        if isinstance(module, MLP) and module.gated and module.act is F.silu:
            module.act_mul = cpu.silu_mul
            swapped.add("silu*up")
    rotary = model.rotary
    if rotary is not None and not rotary.spec.two_d and not rotary.spec.interleaved:
        reference = rotary.apply

        def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            out = cpu.rotary_neox(x, cos, sin) if x.shape[-1] == rotary.dim else None
            return reference(x, cos, sin) if out is None else out

        rotary.apply = apply
        swapped.add("rotary")
    if model.spec.tie_word_embeddings and model.tied_head is None:
        table = model.embed
        if isinstance(table, Int8WeightEmbedding):
            model.tied_head = TiedHead(cpu.int8_weight_linear, table.weight, table.scale)
            swapped.add("int8 head")
        elif table.weight.dtype == torch.float16:
            model.tied_head = TiedHead(cpu.half_weight_linear, table.weight)
            swapped.add("fp16 head")
    refusal = CpuDecodeStack.refusal(model)
    if refusal is None:
        model.layer_stack = CpuDecodeStack(model)
        swapped.add("whole-stack decode")
    return "cpu kernels: " + ", ".join(sorted(swapped)) + (f" (no whole-stack decode: {refusal})" if refusal else "")


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model keeps resident: every distinct parameter/buffer storage (a tied table counts
    once) plus tensors that kernels hold outside the parameter system (e.g. oneDNN-packed weights)."""
    total: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        total[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    extra = sum(m.extra_weight_bytes() for m in model.modules() if hasattr(m, "extra_weight_bytes"))
    return sum(total.values()) + extra
