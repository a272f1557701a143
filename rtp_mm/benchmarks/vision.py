"""``rtp-mm bench --vision``: image-to-first-token time and encoder images/s of every registered vision encoder.

    rtp-mm bench --vision                         # batch 1 and 8, 3 repeats, eager, CPU
    rtp-mm bench --vision --batches 1,8 --repeats 5 --output BENCHMARKS.md

For each family whose declaration names a vision encoder the bench writes a tiny random checkpoint in that family's real
on-disk layout (llava: HF ``LlavaForConditionalGeneration``; qwen_vl: Qwen-VL's ``transformer.visual.*``;
chatglm4v: GLM-4V's ``transformer.vision.*``), loads it with ``LLM`` (FP32, eager, CPU) and measures, at each batch
size b, with fresh random images (the encoder cache never hits):

  image-to-first-token: b requests of one image each, submitted together (a server burst); from submission to the
      first generated token: preprocessing on the callers' threads, the engine's encode stage (ViT batching across
      the requests, encoding, expansion), prefill.
  encoder images/s: b images hashed, preprocessed and encoded in one batch (``prepare_images`` + ``encode``) / s.
  ONNX (``vision_onnx``): export time and size of the visual module, and its CPU images/s at batch b in eager
      torch and in onnxruntime, side by side.

Weights are tiny, so the numbers measure rtp-mm's plumbing and the eager ViT graph at tiny width, not a real model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rtp_mm.benchmarks.report import section_lines, write_section
from rtp_mm.benchmarks.vision_cases import CASES, BenchCase
from rtp_mm.benchmarks.vision_onnx import bench_onnx, render_onnx_table

SECTION_HEADING = "## rtp bench --vision (vision encoders)"
IMAGE_SIZE = (640, 480)  # a typical photo: preprocessing resizes it as the original would
ONNX_DESCRIPTION = (
    "The visual module alone (ViT + projector/resampler) on b stacked images: exported to ONNX (fp32, checked against "
    "eager at batch 1, 3, 8), then eager torch vs onnxruntime (CPUExecutionProvider) with the same thread count, "
    "median of >= 5 runs. Tiny widths: the ratio compares the runtimes' overheads on small graphs, not a real ViT."
)


# ---- measuring ----------------------------------------------------------------------------------------------------
def random_images(n: int, seed: int, size: tuple[int, int] = IMAGE_SIZE) -> list[Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    w, h = size
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")
        for _ in range(n)
    ]


def _burst(llm: Any, prompts: list[list[int]], images: list[Any]) -> list[float]:
    """Submit one one-image request per thread at once; seconds from submission to the first token, per request."""
    from rtp_mm import GenerateConfig

    config = GenerateConfig(max_new_tokens=1, top_k=1, ignore_eos=True)
    barrier = threading.Barrier(len(prompts))
    times = [0.0] * len(prompts)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            llm.generate([prompts[i]], config, images=[[images[i]]])
        except BaseException as e:  # reported by the caller, not lost in a thread
            errors.append(e)
        times[i] = time.perf_counter() - start

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return times


def bench_family(family: str, case: BenchCase, batches: list[int], repeats: int, workdir: Path) -> list[dict]:
    from rtp_mm import LLM, ModelConfig

    path = workdir / family
    case.build(path)
    config = json.loads((path / "config.json").read_text())
    llm = LLM(
        ModelConfig(model_type=case.model_type, ckpt_path=str(path), weight_type="FP32", max_seq_len=2048),
        kv_cache_mem_mb=128,
        skip_tokenizer_init=True,
        concurrency_limit=max(batches),
    )
    try:
        if llm.vision is None:
            return [{"family": family, "error": "the checkpoint loaded but no vision encoder is registered"}]
        seed = 1
        _burst(llm, [case.prompt(config, 0)], random_images(1, seed))  # warm-up: first-call allocations
        rows = []
        for b in batches:
            ttft: list[float] = []
            rates: list[float] = []
            for _ in range(repeats):
                seed += 1
                ttft += _burst(llm, [case.prompt(config, i) for i in range(b)], random_images(b, seed))
                seed += 1
                images = random_images(b, seed)
                start = time.perf_counter()
                rows_out = llm.vision.encode([image.pixels for image in llm.client.prepare_images(images)])
                rates.append(b / (time.perf_counter() - start))
            rows.append(
                {
                    "family": family,
                    "model_type": case.model_type,
                    "batch": b,
                    "rows_per_image": int(rows_out[0].shape[0]),
                    "ttft_ms_mean": 1000 * statistics.mean(ttft),
                    "ttft_ms_max": 1000 * max(ttft),
                    "images_per_s": statistics.median(rates),
                }
            )
        seed += 1
        pixels = {b: [llm.vision.preprocess(im) for im in random_images(b, seed + b)] for b in batches}
        onnx = bench_onnx(llm.vision, pixels, repeats, workdir)
        return [{**r, **onnx[r["batch"]]} for r in rows]
    finally:
        llm.shutdown()


def run(cases: dict[str, BenchCase], batches: list[int], repeats: int, families: list[str] | None = None) -> list[dict]:
    """One row per (registered family, batch); a family that cannot be benched gets one row with ``error``."""
    from rtp_mm.llm.models import FAMILIES

    encoders = {name for name, family in FAMILIES.items() if family.vision}
    wanted = families or sorted(encoders | set(cases))  # a family without an encoder shows as an error row
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rtp-bench-vision-") as tmp:
        for family in wanted:
            if family not in encoders:
                results.append({"family": family, "error": "no vision encoder registered"})
            elif family not in cases:
                results.append({"family": family, "error": "the bench has no tiny checkpoint for this family"})
            else:
                try:
                    results += bench_family(family, cases[family], batches, repeats, Path(tmp))
                except Exception as e:
                    results.append({"family": family, "error": f"{type(e).__name__}: {e}"})
    return results


def render_table(results: list[dict]) -> str:
    lines = [
        "| family | batch | rows/image | image-to-first-token mean (ms) | max (ms) | encoder images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['family']} | - | - | - | - | error: {r['error']} |")
        else:
            lines.append(
                f"| {r['family']} | {r['batch']} | {r['rows_per_image']} | {r['ttft_ms_mean']:.1f} | "
                f"{r['ttft_ms_max']:.1f} | {r['images_per_s']:.1f} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtp-mm bench --vision", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8", help="concurrent one-image requests per burst, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="bursts per batch size")
    p.add_argument("--families", default="", help="comma-separated families (default: every registered encoder)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output", help="markdown file whose vision-bench section is written/replaced")
    p.add_argument("--json", help="write every number to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches={args.batches!r}: accepted a comma-separated list of positive integers")
    if not batches or min(batches) < 1 or args.repeats < 1:
        parser.error("--batches needs positive integers and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()] or None
    results = run(CASES, batches, args.repeats, families)
    table = render_table(results) + "\n\n" + ONNX_DESCRIPTION + "\n\n" + render_onnx_table(results)
    print(table)
    command = "rtp-mm bench --vision" + (f" {' '.join(argv)}" if argv else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.output:
        description = (
            f"Tiny random weights in each family's real layout, FP32, eager, CPU; {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} "
            "random images, never cached. Image-to-first-token: b one-image requests submitted together."
        )
        lines = section_lines(SECTION_HEADING, command, date, machine, description, table)
        write_section(Path(args.output), "\n".join(lines), SECTION_HEADING)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "date": date, "results": results}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
