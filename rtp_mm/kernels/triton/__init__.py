"""Triton kernels behind the pure-torch ops' signatures: the GPU backend of ``rtp_mm.kernels``.

One module per kernel, each with a wrapper of the same signature as the reference op it replaces:

| module | wrapper | reference |
|---|---|---|
| ``decode_attention`` | ``decode_attention`` | ``attention._decode_attention`` |
| ``prefill_attention`` | ``prefill_attention`` | one prefill chunk of ``attention.paged_attention`` |
| ``paged_attention`` | ``paged_attention`` (the two above, drop-in) | ``attention.paged_attention`` |
| ``add_norm`` | ``add_rms_norm``, ``add_layer_norm`` | ``decoder.RMSNorm`` / ``nn.LayerNorm`` of ``x + residual`` |
| ``rotary`` | ``apply_rotary`` | ``rope.RotaryEmbedding.apply`` |
| ``int8_linear`` | ``int8_weight_linear`` | ``linear.int8_weight_linear`` |

``triton`` is optional: nothing here imports it at module level unguarded, so ``import rtp_mm`` never needs it. The
kernels are plain functions that ``launcher`` turns into a launchable Triton kernel per device kind: compiled for
CUDA tensors, run by Triton's interpreter for CPU tensors (this triton has no CPU backend). Choosing by the tensors'
device, not by TRITON_INTERPRET at import time, lets one process test both (the CPU tests and the ``gpu``-marked
CUDA tests share one pytest session) and keeps a compiled kernel from ever receiving CPU pointers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def _triton_module() -> Any | None:
    try:
        import triton
    except ImportError:  # triton is an optional dependency: the torch backend runs everywhere
        return None
    return triton


def triton_available() -> bool:
    """True when triton imports and its kernels can run here: a CUDA device, or the interpreter (TRITON_INTERPRET=1,
    which triton itself reads)."""
    triton = _triton_module()
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; the kernels are written against 3.9
    return torch.cuda.is_available() or (knobs is not None and bool(knobs.runtime.interpret))


def select_backend(device: torch.device | str) -> str:
    """The kernels' backend for ``device``: "triton" on a CUDA device where triton imports, else "torch" (the reference
    ops). Chosen once at start-up by whoever builds the model, never per call: the interpreter that runs the kernels on
    CPU is a test tool, far slower than torch."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and _triton_module() is not None:
        return "triton"
    return "torch"


@functools.cache  # one launchable kernel per (function, mode): a JITFunction keeps its compiled binaries
def _launchable(fn: Callable, interpret: bool) -> Any:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def launcher(fn: Callable, device: torch.device) -> Any:
    """``fn`` (a module-level kernel function written in triton.language) made launchable as ``kernel[grid](...)``
    for tensors on ``device``: compiled on CUDA, interpreted elsewhere."""
    if _triton_module() is None:
        raise RuntimeError(
            "the triton backend needs the `triton` package; the torch backend (rtp_mm.kernels) runs without"
        )
    return _launchable(fn, device.type != "cuda")


def dot_in_fp32(device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether a kernel hands tl.dot fp32 operands: for fp32 data (exact "ieee" dots, where CUDA would default to
    tf32), for operands of two dtypes, and for bf16 in the interpreter, whose tl.dot multiplies bf16's raw bits
    (triton 3.9 holds bf16 as uint16 there). Compiled CUDA kernels keep fp16/bf16 operands for the tensor cores."""
    if torch.float32 in dtypes or len(set(dtypes)) > 1:
        return True
    return dtypes[0] == torch.bfloat16 and device.type != "cuda"


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """Triton's tile sizes are powers of two; tl.dot needs each side >= 16."""
    return max(minimum, 1 << max(0, n - 1).bit_length())
