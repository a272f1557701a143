"""Vision encoders: one module per family (llava, qwen_vl, chatglm4v), each named by its family declaration."""
