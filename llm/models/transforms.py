"""Transformations applied to a built model (gpt-fast style): they never branch inside the decoder's maths."""

from __future__ import annotations

import torch
from torch import nn

from rtp_mm.kernels.linear import HalfWeightLinear
from rtp_mm.llm.models.decoder import Decoder


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
