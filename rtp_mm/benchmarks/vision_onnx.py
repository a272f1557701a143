"""The ONNX part of ``rtp-mm bench --vision``: per encoder, the ONNX export (time, size, onnxruntime check) and CPU
images/s of the visual module alone, eager torch against onnxruntime on the same stacked pixels.

This is what decides whether onnxruntime is offered as a CPU vision backend: it only pays where its column beats
eager's. Both run with the same thread count (torch's); each rate is the median of ``max(MIN_REPEATS, repeats)``
timed runs after one warm-up run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MIN_REPEATS = 5


def _rate(run: Callable[[], Any], images: int, repeats: int) -> float:
    """Median images/s of ``run`` (one warm-up call first: first-call allocations and session set-up)."""
    run()
    rates = []
    for _ in range(max(MIN_REPEATS, repeats)):
        start = time.perf_counter()
        run()
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_onnx(vision: Any, pixels: dict[int, list[torch.Tensor]], repeats: int, workdir: Path) -> dict[int, dict]:
    """Export ``vision`` (a VisionModel) once, then per batch size b (``pixels[b]``: b preprocessed images) the
    eager and onnxruntime images/s of its visual module on ``vision.stack(pixels[b])``. Returns per b the row fields;
    on failure each row holds ``onnx_error`` instead."""
    from rtp_mm.trt_builders.onnx_export import export_onnx
    from rtp_mm.trt_builders.ort_backend import OnnxRuntimeEncoder

    try:
        report = export_onnx(vision, workdir / f"{vision.family}.onnx")
        encoder = OnnxRuntimeEncoder(report.onnx_path, threads=torch.get_num_threads())
    except Exception as e:
        return {b: {"onnx_error": f"{type(e).__name__}: {e}"} for b in pixels}
    module = vision.visual_module()
    rows = {}
    for b, images in pixels.items():
        batch = vision.stack(images)

        def eager(batch: torch.Tensor = batch) -> Any:
            with torch.inference_mode():
                return module(batch)

        rows[b] = {
            "onnx_export_s": report.export_seconds,
            "onnx_mb": report.onnx_bytes / 1e6,
            "onnx_max_abs_err": max(c.max_abs_err for c in report.checks),
            "eager_images_per_s": _rate(eager, len(images), repeats),
            "ort_images_per_s": _rate(lambda batch=batch: encoder(batch), len(images), repeats),
        }
    return rows


def render_onnx_table(results: list[dict]) -> str:
    lines = [
        "| family | batch | ONNX export (s) | ONNX (MB) | max abs err | eager images/s | onnxruntime images/s "
        "| onnxruntime / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        error = r.get("error") or r.get("onnx_error")
        if error:
            lines.append(f"| {r['family']} | {r.get('batch', '-')} | - | - | - | - | - | error: {error} |")
        else:
            eager, ort = r["eager_images_per_s"], r["ort_images_per_s"]
            lines.append(
                f"| {r['family']} | {r['batch']} | {r['onnx_export_s']:.2f} | {r['onnx_mb']:.2f} | "
                f"{r['onnx_max_abs_err']:.1e} | {eager:.1f} | {ort:.1f} | {ort / eager:.2f}x |"
            )
    return "\n".join(lines)
