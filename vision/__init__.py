from rtp_mm.vision import llava  # noqa: F401  (registers VISION_LOADERS['llava'])
