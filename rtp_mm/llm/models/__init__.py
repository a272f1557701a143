"""The family registry: every model family rtp-mm serves, one line per family file.

A family file (``llama.py``, ``chatglm.py``, ...) holds the family's maths as data (``DecoderSpec`` fields and a weight
table) and its declaration(s) (``FAMILIES``: MODEL_TYPE names, detection, layout, tokenizer adapter, vision encoder;
see ``family.Family``). Adding a family is its own file plus one line here. ``rtp_mm.model_types`` answers every
question about MODEL_TYPE names from this table.
"""

from __future__ import annotations

from rtp_mm.llm.models import (
    baichuan,
    bloom,
    chatglm,
    falcon,
    gpt_bigcode,
    gpt_neox,
    llama,
    mpt,
    phi,
    qwen_v1,
    starcoder2,
    vision_text,
)
from rtp_mm.llm.models.family import Family, registry

FAMILIES: dict[str, Family] = registry(
    [
        *chatglm.FAMILIES,  # chatglm, glm_130b, chatglm2, chatglm3
        *gpt_bigcode.FAMILIES,
        *starcoder2.FAMILIES,
        *bloom.FAMILIES,  # bloom, sgpt_bloom_vector
        *llama.FAMILIES,  # llama (xverse, aquila, internlm), gemma, qwen_2
        *baichuan.FAMILIES,
        *gpt_neox.FAMILIES,
        *qwen_v1.FAMILIES,
        *falcon.FAMILIES,
        *mpt.FAMILIES,
        *phi.FAMILIES,
        *vision_text.FAMILIES,  # llava, qwen_vl, chatglm4v
    ]
)
