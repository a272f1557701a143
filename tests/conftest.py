"""Shared fixtures, and the suite's skip policy.

The real default model (SmolLM2-135M GGUF) is loaded once per session: it takes seconds.

Skip policy: only tests marked ``gpu`` may skip (where no CUDA device or TensorRT is present). Any other skip fails
the run, so a missing dependency or data folder can never turn into a green run that compared nothing; the summary
line ``skipped: N (gpu N)`` shows what did not run.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter runs the CPU tests of rtp_mm/kernels/triton. It must be on before triton is first imported
# (by any test module or library): triton.jit reads it when triton's own library functions are defined, and an
# interpreted kernel cannot call compiled ones. On a CUDA machine the compiled kernels run instead (the ``gpu`` tests;
# scripts/gpu_check.sh).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_BAD_SKIPS_KEY = pytest.StashKey[list]()
_GPU_SKIPS_KEY = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BAD_SKIPS_KEY] = []
    config.stash[_GPU_SKIPS_KEY] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.skipped and report.when in ("setup", "call"):
        key = _GPU_SKIPS_KEY if item.get_closest_marker("gpu") else _BAD_SKIPS_KEY
        item.config.stash[key].append(item.nodeid)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash[_BAD_SKIPS_KEY] and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    bad, gpu = config.stash[_BAD_SKIPS_KEY], config.stash[_GPU_SKIPS_KEY]
    terminalreporter.write_line(f"skipped: {len(bad) + len(gpu)} (gpu {len(gpu)})")
    for nodeid in bad:
        terminalreporter.write_line(f"NOT ALLOWED: {nodeid} skipped without the gpu marker (only gpu tests may skip)")


@pytest.fixture(scope="session")
def default_llm():
    from rtp_mm import LLM, ModelConfig

    llm = LLM(ModelConfig(weight_type="FP32"), kv_cache_mem_mb=256)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def default_hf_model():
    """HF transformers' own GGUF loader: dequantizes the same file independently of rtp-mm's reader."""
    import torch
    from transformers import AutoModelForCausalLM

    from rtp_mm.default_model import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def url(llm):
    """The real server for the requesting module's ``llm`` fixture, on a loopback port (modules that need other
    server settings define their own ``url``)."""
    from rtp_mm_testing.serving import background_server

    with background_server(llm) as url:
        yield url
