"""LoRA adapters (PEFT folders) for every text family and the vision families' language models.

- ``peft_files``: read an adapter folder (config, A/B tensors, scales) and refuse what plain LoRA is not;
- ``mapping``: land its Hugging Face module names on the decoder's (fused) projections through the family's table;
- ``layers``: merge into the weights, or wrap the projections for per-row adapters (``rtp_mm.kernels.lora``);
- ``manager``: the engine's adapters (RTP-LLM's merged-one / dynamic-several rules, updates, step rows).
"""
