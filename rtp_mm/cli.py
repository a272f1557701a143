"""The ``rtp-mm`` console script: ``serve`` (the env-configured server), ``bench`` and ``build-vit``."""

from __future__ import annotations

import argparse
import sys

from rtp_mm.errors import RtpMmError


def _serve(args: argparse.Namespace) -> int:
    from rtp_mm.start_server import main as serve_main

    return serve_main()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtp-mm", description="rtp-mm: a multimodal-first LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (configured by environment variables, see README)")
    serve.set_defaults(func=_serve)
    sub.add_parser("bench", help="benchmark rtp-mm against HF transformers (see `rtp-mm bench --help`)")
    from rtp_mm.trt_builders.cli import add_parser as add_build_vit

    add_build_vit(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark owns its flags (and its --help)
        from rtp_mm.benchmarks.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RtpMmError as e:
        print(f"rtp-mm: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
