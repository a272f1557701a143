"""``rtp-mm bench [--vision | --structured | --speculative | --lora] ...``: the text benchmark, the vision one with
``--vision``, the structured-outputs one with ``--structured``, the speculative-decoding one with ``--speculative`` or
the multi-LoRA one with ``--lora`` (each owns its flags)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--lora" in argv:
        from rtp_mm.benchmarks.lora import main as lora_main

        return lora_main([a for a in argv if a != "--lora"])
    if "--structured" in argv:
        from rtp_mm.benchmarks.structured import main as structured_main

        return structured_main([a for a in argv if a != "--structured"])
    if "--speculative" in argv:
        from rtp_mm.benchmarks.speculative import main as speculative_main

        return speculative_main([a for a in argv if a != "--speculative"])
    if "--vision" in argv:
        from rtp_mm.benchmarks.vision import main as vision_main

        return vision_main([a for a in argv if a != "--vision"])
    from rtp_mm.benchmarks.text import main as text_main

    return text_main(argv)
