"""CPU fp32 weight packing: every projection (and the LM head) goes through oneDNN with pre-packed weights.

A transformation applied to a built Decoder; the maths is unchanged (see ``rtp_mm.kernels.packed_linear``).
"""

from __future__ import annotations

import torch
from torch import nn

from rtp_mm.kernels.packed_linear import PackedLinear, onednn_available
from rtp_mm.llm.models.decoder import Decoder


def can_pack(model: Decoder) -> bool:
    return onednn_available() and model.norm.weight.device.type == "cpu" and model.act_dtype == torch.float32


def pack_linears(model: Decoder) -> Decoder:
    """Replace fp32 nn.Linear layers by PackedLinear. A tied LM head gets a packed copy of the embedding table (the
    table itself stays for lookups): the head is the largest matrix of small models and gains most."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, PackedLinear.from_linear(child))
    if model.spec.tie_word_embeddings and model.embed.weight.dtype == torch.float32:
        model.tied_head = PackedLinear(model.embed.weight, None)
    return model
