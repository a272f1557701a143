"""CUDA graphs of the decode step (PRE_ALLOCATE_OP_MEM=1 on CUDA): one graph per batch size, captured at start-up.

A step of decodes only launches the same few hundred kernels every time; on a GPU their launch overhead is most of
a small batch's step. ``DecodeGraphs`` captures the decoder's forward over persistent step buffers (token ids,
positions, sequence lengths, slot mapping, block tables, context lengths) at each size of ``capture_sizes``. A step
of n decodes copies its inputs into the first n rows, pads the rest up to the next captured size and replays. Pad
rows read and write one KV block that no sequence owns (``attach_decode_graphs`` takes it from the block manager's
pool), attend to that block only, and their hidden states are dropped; the LM head and the sampler run eagerly on
the n real rows.

What a graph may capture: only tensor work with fixed shapes and no host synchronisation. Hence the block tables are
captured at their widest (max_seq_len / block_size blocks, padded with the pad block) and attention must read the
context lengths from a tensor: the Triton decode kernel does for every cache, the CPU one for float32 caches
(``graph_safe(cache)`` on the op); the torch reference cuts the context with a Python int and is refused. Also
refused, each with the reason logged: tensor parallelism (collectives), P-tuning prefixes (the metadata is rebuilt
per step), and the dynamic rope scalings, which pick frequencies per length on the host. ``run`` declines steps
with prefill chunks, more rows than the largest graph, or LoRA adapter rows (captured without adapters), and the
eager forward runs them.

``graph_factory`` / ``capture`` default to ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` on CUDA and to
``EagerGraph`` elsewhere (tests), which re-runs the captured function on the same buffers: that checks the buffers,
padding and pad block everywhere but cannot check the CUDA capture itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rtp_mm.kernels.attention import AttnMetadata

# Decode batch sizes captured (those up to the engine's concurrency limit, plus the limit itself up to 256).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Devices whose runners capture graphs at start-up. Tests add "cpu", where EagerGraph replays by re-running.
CAPTURE_DEVICES = ("cuda",)


def capture_sizes(concurrency_limit: int) -> list[int]:
    limit = min(concurrency_limit, GRAPH_BATCH_SIZES[-1])
    return sorted({s for s in GRAPH_BATCH_SIZES if s <= limit} | {limit})


def attach_decode_graphs(runner: Any, num_blocks: int, max_seq_len: int, concurrency_limit: int) -> tuple[int, str]:
    """Capture the runner's decode graphs, taking the highest of its ``num_blocks`` usable blocks as the pad block.
    Returns the blocks left for the block manager and a line for the start-up log."""
    refusal = graph_refusal(runner.model, runner)
    if refusal is not None:
        return num_blocks, f"decode CUDA graphs off: {refusal}"
    runner.pad_block = num_blocks - 1
    max_blocks = -(-max_seq_len // runner.block_size)
    runner.graphs = DecodeGraphs(runner, max_blocks, capture_sizes(concurrency_limit))
    sizes = ", ".join(map(str, runner.graphs.sizes))
    return num_blocks - 1, f"decode CUDA graphs for batch sizes {sizes} captured in {runner.graphs.capture_s:.1f} s"


def graph_refusal(model: Any, runner: Any) -> str | None:
    """None when the runner's model can be captured, else why not."""
    if model.tp is not None:
        return "tensor parallelism"
    if runner.kv_prefix is not None:
        return "a P-tuning prefix"
    if model.rotary is not None and model.rotary.spec.scaling in ("dynamic", "qwen_ntk"):
        return f"rope scaling {model.rotary.spec.scaling!r} picks frequencies on the host"
    safe = getattr(model.layers[0].attn.attend, "graph_safe", None)
    if safe is None or not safe(runner.caches[0]):
        return "the attention op reads context lengths on the host for this cache (the Triton kernels do not)"
    return None


class EagerGraph:
    """A stand-in for torch.cuda.CUDAGraph off CUDA: replay re-runs what was captured, on the same buffers."""

    def __init__(self) -> None:
        self.fn: Callable[[], Any] | None = None

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()


class DecodeGraphs:
    def __init__(
        self,
        runner: Any,  # ModelRunner: its model, caches, block size and pad block
        max_blocks: int,  # block-table width: ceil(max_seq_len / block_size)
        sizes: Sequence[int],
        graph_factory: Callable[[], Any] | None = None,
        capture: Callable[[Any], Any] | None = None,
    ):
        self.runner = runner
        self.model = runner.model
        self.sizes = sorted(set(sizes))
        self.max_rows = self.sizes[-1]
        dev, n = runner.device, self.max_rows
        self.pad_block = runner.pad_block
        bs = runner.block_size
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.prompt_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.pad_block * bs, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), self.pad_block, dtype=torch.long, device=dev)
        self.lens = torch.ones(n, dtype=torch.long, device=dev)
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, Any] = {}
        on_cuda = torch.device(dev).type == "cuda"
        factory = graph_factory or (torch.cuda.CUDAGraph if on_cuda else EagerGraph)
        capture = capture or (torch.cuda.graph if on_cuda else None)
        start = time.perf_counter()
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            self._forward(size)  # warm-up outside capture (lazy inits, autotuning)
            graph = factory()
            if capture is None:  # EagerGraph: a replay writes into the captured output, as a CUDA graph does
                self.outputs[size] = self._forward(size)
                graph.fn = lambda size=size: self.outputs[size].copy_(self._forward(size))
            else:
                with capture(graph):
                    self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        self.capture_s = time.perf_counter() - start

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        meta = AttnMetadata(
            slot_mapping=self.slots[:size],
            num_decode_tokens=size,
            decode_block_tables=self.tables[:size],
            decode_context_lens=self.lens[:size],
            # an upper bound; graph-safe attention reads the lengths and builds no mask
            decode_max_context=self.tables.shape[1] * self.runner.block_size,
            decode_mask=None,
            prefills=(),
            block_size=self.runner.block_size,
        )
        out = self.model(
            self.ids[:size],
            self.positions[:size],
            meta,
            self.runner.caches,
            seq_lens=self.seq_lens[:size],
            prompt_lens=self.prompt_lens[:size],
        )
        return out

    def run(self, batch: Any, inputs: Any) -> torch.Tensor | None:
        """Hidden states [n, hidden] of an all-decode step of n <= max_rows rows from a replay, or None."""
        n = inputs.input_ids.shape[0]
        meta = inputs.meta
        if meta.prefills or meta.num_decode_tokens != n or n > self.max_rows or inputs.mm_rows:
            return None
        if any(getattr(seq, "adapter", None) is not None for seq in batch.seqs):
            return None
        size = next(s for s in self.sizes if s >= n)
        width = meta.decode_block_tables.shape[1]
        if width > self.tables.shape[1]:
            return None
        self.ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.seq_lens[:n].copy_(inputs.seq_lens)
        if inputs.prompt_lens is not None:
            self.prompt_lens[:n].copy_(inputs.prompt_lens)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :width].copy_(meta.decode_block_tables)
        self.tables[:n, width:].fill_(self.pad_block)
        self.lens[:n].copy_(meta.decode_context_lens)
        self._reset_pad_rows(n, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _reset_pad_rows(self, n: int, size: int) -> None:
        """Rows n..size of the replayed graph: position 0 of the pad block, as captured."""
        if n == size:
            return
        self.ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.seq_lens[n:size].fill_(1)
        self.prompt_lens[n:size].fill_(1)
        self.slots[n:size].fill_(self.pad_block * self.runner.block_size)
        self.tables[n:size].fill_(self.pad_block)
        self.lens[n:size].fill_(1)
