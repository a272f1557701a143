from rtp_mm.vision import chatglm4v  # noqa: F401  (registers VISION_LOADERS["chatglm4v"])
