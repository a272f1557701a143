"""The CPU kernel backend: C++ ops for the decode step (``kernels.cpp``), compiled once per machine and cached.

| op (``torch.ops.rtp_mm_cpu``) | wrapper here | reference |
|---|---|---|
| ``int8_linear`` | ``int8_weight_linear`` (<= KERNEL_MAX_ROWS rows) | ``linear.int8_weight_linear`` |
| ``half_linear`` | ``half_weight_linear`` | ``linear.half_weight_linear`` |
| ``rms_norm`` | ``rms_norm`` | ``F.rms_norm`` |
| ``rotary_neox_`` | ``rotary_neox`` | ``rope.RotaryEmbedding.apply`` (NeoX, whole head) |
| ``silu_mul`` | ``silu_mul`` | ``F.silu(gate) * up`` |
| ``decode_attention`` | ``paged_attention`` (drop-in) | ``attention.paged_attention`` |

Every wrapper keeps its reference's signature and hands any input outside its kernel's contract (other dtypes,
devices, more rows than KERNEL_MAX_ROWS) to the reference, so swapping them in never changes what a model accepts.

The kernels need AVX2, FMA and F16C (every x86-64 CPU since 2013; the AVX-512 machines here run the same code) and
a C++ compiler: ``torch.utils.cpp_extension`` builds them on first use into its cache (TORCH_EXTENSIONS_DIR, by
default ~/.cache/torch_extensions; ~20 s on two cores) and later processes load the cached library. Where either is
missing, ``unavailable_reason`` says why and the model keeps the torch ops.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rtp_mm.kernels import attention, linear

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
REQUIRED_FLAGS = ("avx2", "fma", "f16c")
# Rows up to which the weight-only kernel beats upcast + fp32 GEMM: 4-row x 2-channel register tiles widen each 8
# weights once per 4 rows. int8, one thread pair on the 2-core EPYC, weights streamed from DRAM (us, kernel / torch):
# 960x576 at 1, 16, 32, 64 rows: 40/167, 211/392, 398/516, 776/737; 49152x576: 1268/4873, 8901/11217,
# 19809/20342, 35674/33218. The whole-stack decode takes steps of up to this many decodes too.
KERNEL_MAX_ROWS = 32


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def _load() -> tuple[Any, str | None]:
    """(the ops namespace, None) or (None, why not). Built at most once per process."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the CPU kernels are x86-64 AVX2 code and this machine is {platform.machine()}"
    missing = [f for f in REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        logger.info("loading the CPU kernels (a machine's first start compiles them, about 20 s)")

        cpp_extension.load(
            name="rtp_mm_cpu",
            sources=[str(SOURCE)],
            # -fopenmp for at::parallel_for's pragma (a header template); the GOMP symbols bind to torch's own
            # OpenMP runtime when the library loads, since libgomp is not linked in (a second runtime's threads
            # would fight torch's for the two cores).
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the torch ops still work
        return None, f"building {SOURCE.name} failed ({type(e).__name__}: {str(e).strip().splitlines()[-1:]})"
    return torch.ops.rtp_mm_cpu, None


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the PyPI package's binary sits in the venv, which may not be on it."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def unavailable_reason() -> str | None:
    """None when the CPU kernels are built and loaded here, else why not (builds them on first call)."""
    return _load()[1]


def ops() -> Any:
    """``torch.ops.rtp_mm_cpu``; raises RuntimeError naming the reason when the kernels cannot run here."""
    namespace, reason = _load()
    if namespace is None:
        raise RuntimeError(f"rtp-mm CPU kernels unavailable: {reason}")
    return namespace


def _gemv_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= KERNEL_MAX_ROWS


def int8_weight_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if not _gemv_rows(x) or (bias is not None and bias.dtype != torch.float32):
        return linear.int8_weight_linear(x, weight, scale, bias)
    return ops().int8_linear(x.contiguous(), weight, scale, bias)


def half_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not _gemv_rows(x) or weight.dtype != torch.float16 or (bias is not None and bias.dtype != torch.float32):
        return linear.half_weight_linear(x, weight, bias)
    return ops().half_linear(x.contiguous(), weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return F.rms_norm(x, weight.shape, weight, eps)
    return ops().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps).view(x.shape)


def rotary_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """NeoX rotary of x [tokens, heads, dim] in place, with ``cos_sin``'s full-width tables; None when the inputs are
    outside the kernel's contract (the caller then runs the reference)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1 or cos.shape[-1] != x.shape[-1]:
        return None
    return ops().rotary_neox_(x, cos.contiguous(), sin.contiguous())


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] along the last dim."""
    if h.dtype != torch.float32 or h.dim() != 2 or h.device.type != "cpu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return ops().silu_mul(h.contiguous())


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cache: attention.KVCache | attention.Int8KVCache,
    meta: attention.AttnMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Drop-in for ``attention.paged_attention``: decodes read a float32 paged cache in place through their block
    tables; prefill chunks, INT8 and half-precision caches run the reference."""
    nd = meta.num_decode_tokens
    if not nd or type(cache) is not attention.KVCache or cache.k.dtype != torch.float32 or q.dtype != torch.float32:
        return attention.paged_attention(q, k, v, cache, meta, scale, alibi_slopes)
    cache.write(k, v, meta.slot_mapping)
    slopes = None if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()
    decoded = ops().decode_attention(
        q[:nd],
        cache.k,
        cache.v,
        meta.decode_block_tables.contiguous(),
        meta.decode_context_lens.contiguous(),
        scale,
        meta.first_key,
        slopes,
    )
    if not meta.prefills:
        return decoded
    return torch.cat([decoded, *attention.prefill_attention(q, k, v, cache, meta, scale, alibi_slopes)])


# Whether a decode graph may capture this op over ``cache`` (llm/engine/cuda_graphs.py): the C++ decode attention reads
# the context lengths from tensors; other caches fall back to the reference, which cuts contexts with host ints.
paged_attention.graph_safe = lambda cache: type(cache) is attention.KVCache and cache.k.dtype == torch.float32  # type: ignore[attr-defined]
