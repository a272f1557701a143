"""Vision encoders; importing a family's module registers its loader in ``VISION_LOADERS``."""

from rtp_mm.vision import chatglm4v, llava, qwen_vl  # noqa: F401
