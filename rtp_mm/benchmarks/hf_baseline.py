"""The HF transformers side of the text benchmark: the default model in fp32 and static left-padded batches."""

from __future__ import annotations

import statistics
import time
from typing import Any

from rtp_mm.benchmarks.report import log, rss_now_mb
from rtp_mm.benchmarks.workload import RequestTiming, StreamTiming, Workload, serve_metrics, single_metrics


class _StepClock:
    """A generate() streamer that only stamps times: put() #0 is the prompt, put() #k the k-th generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model: Any, rows: list[list[int]], num_new: int, pad_id: int) -> tuple[Any, _StepClock]:
    """Left-padded static batch; min_new_tokens = max_new_tokens keeps EOS from ending any row early."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    clock = _StepClock()
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=num_new,
        min_new_tokens=num_new,
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    if out.shape[1] != width + num_new or len(clock.times) != num_new + 1:
        raise RuntimeError(f"HF generated {out.shape[1] - width} steps where {num_new} were asked")
    return out[:, width:], clock


def _hf_single(model: Any, ids: list[int], num_new: int, pad_id: int) -> StreamTiming:
    start = time.perf_counter()
    out, clock = _hf_generate(model, [ids], num_new, pad_id)
    return StreamTiming(start, clock.times[1], clock.times[-1], time.perf_counter(), out[0].tolist())


def _hf_serve(model: Any, w: Workload, pad_id: int) -> list[RequestTiming]:
    timings = []
    arrival = time.perf_counter()
    for lo in range(0, len(w.serve_prompts), w.max_in_flight):
        batch = range(lo, min(lo + w.max_in_flight, len(w.serve_prompts)))
        submit = time.perf_counter()
        _, clock = _hf_generate(
            model, [w.serve_prompts[i] for i in batch], max(w.serve_new_tokens[i] for i in batch), pad_id
        )
        end = time.perf_counter()
        timings += [RequestTiming(arrival, submit, clock.times[1], end) for _ in batch]
    return timings


def load_hf_default_model() -> Any:
    """HF ``LlamaForCausalLM`` in fp32 holding the default GGUF's weights as rtp-mm's reader dequantizes them (the
    same tensors as transformers' own GGUF loader, see tests/test_llm/test_default_model_parity.py, which takes ~25 s
    longer here to produce them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rtp_mm.default_model import default_model_path
    from rtp_mm.llm.loader.gguf_reader import GGUFCheckpoint

    with GGUFCheckpoint(default_model_path()) as ckpt:
        config = ckpt.config()
        state = dict(ckpt.iter_tensors())
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF model does not fit the checkpoint: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def run_hf(w: Workload, phases: str) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    model = load_hf_default_model()
    result: dict[str, Any] = {"metrics": {"load_s": time.perf_counter() - start, "rss_loaded_mb": rss_now_mb()}}
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else model.config.eos_token_id
    log(f"HF loaded in {result['metrics']['load_s']:.0f} s; running {phases}")
    _hf_generate(model, [w.decode_prompt], w.warmup_new_tokens, pad_id)
    if "a" in phases:
        t = _hf_single(model, w.decode_prompt, w.decode_new_tokens, pad_id)
        result["metrics"].update(single_metrics("a", t, w.decode_new_tokens))
        result["decode_ids"] = t.token_ids
    if "c" in phases:
        ttfts = [_hf_single(model, w.ttft_prompt, 1, pad_id) for _ in range(w.ttft_repeats)]
        result["metrics"]["c_ttft_ms"] = statistics.median((t.first - t.start) * 1000 for t in ttfts)
    if "b" in phases:
        result["metrics"].update(serve_metrics(_hf_serve(model, w, pad_id), w.serve_new_tokens))
    return result
