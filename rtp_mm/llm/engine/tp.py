"""Tensor parallelism in the engine: rank 0 decides, every rank computes its shard.

Rank 0 runs everything a single-rank engine runs (tokenizer, scheduler, vision encoder, sampler). Before each unit
of model work its ``ModelRunner.announce`` (a ``ShardDriver``) broadcasts it over the group's control channel: a
step's frozen ``ScheduledBatch`` (stripped to what the forward reads: no generators, grammars or adapters), or the
prompts of an embedding forward. Each shard worker (``serve_shard``) runs the same forward and the same LM-head calls,
so every rank enters the same collectives in the same order; sampling happens once, on rank 0.

While idle, rank 0 sends a heartbeat every ``HEARTBEAT_S`` (a broadcast and a one-element all-reduce), so a rank that
died or hung is noticed within the compute timeout even when no request comes: the engine stops with
``GroupFailed`` (llm/engine/loop.py), and the server exits.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from rtp_mm.kernels.collectives import GroupFailed, TPGroup
from rtp_mm.llm.engine.model_runner import ModelRunner
from rtp_mm.llm.engine.scheduler import ScheduledBatch, ScheduledSeq

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0


def shard_view(batch: ScheduledBatch) -> ScheduledBatch:
    """What a worker's forward reads of ``batch``: sampling parameters without the generator, grammar and token
    history (rank 0 samples), no LoRA adapter (refused under TP), image rows on the CPU (each rank moves them)."""

    def strip(seq: ScheduledSeq) -> ScheduledSeq:
        sampling = seq.sampling
        if sampling is not None:
            sampling = dataclasses.replace(sampling, generator=None, grammar=None, token_ids=())
        mm = tuple(dataclasses.replace(m, embeds=m.embeds.cpu()) for m in seq.mm_inputs)
        proposal = seq.proposal
        if proposal is not None and proposal.draft_probs is not None:
            proposal = dataclasses.replace(proposal, draft_probs=None)
        return dataclasses.replace(seq, sampling=sampling, mm_inputs=mm, adapter=None, proposal=proposal)

    return dataclasses.replace(
        batch, decodes=tuple(map(strip, batch.decodes)), prefills=tuple(map(strip, batch.prefills))
    )


class ShardDriver:
    """Rank 0's side: installed as ``runner.announce``; ``idle()`` is called by the engine between steps."""

    def __init__(self, group: TPGroup, runner: ModelRunner, on_stop: Callable[[], None] | None = None):
        self.group = group
        self.last = time.monotonic()
        self.on_stop = on_stop  # after the workers were told: reap them (api/tp_launch.stop_group)
        runner.announce = self.announce

    def announce(self, work: tuple[Any, ...]) -> None:
        kind = work[0]
        self.group.broadcast((kind, shard_view(work[1])) if kind == "step" else work)
        self.last = time.monotonic()

    def idle(self) -> None:
        if time.monotonic() - self.last >= HEARTBEAT_S:
            self.group.broadcast(("ping",))
            self.group.heartbeat()
            self.last = time.monotonic()

    def stop(self) -> None:
        """Tell the workers to exit (at shutdown; a failed group is past telling)."""
        try:
            self.group.broadcast(("stop",))
        except GroupFailed:
            pass
        if self.on_stop is not None:
            self.on_stop()


def serve_shard(runner: ModelRunner, group: TPGroup) -> None:
    """A worker rank's whole life after loading: run what rank 0 announces until it says stop (or the group fails,
    which raises GroupFailed)."""
    logger.info("tensor-parallel rank %d of %d ready", group.rank, group.size)
    while True:
        work = group.broadcast(None)
        kind = work[0]
        if kind == "step":
            runner.run_shard(work[1])
        elif kind == "hidden":
            runner.prefill_hidden(work[1])
        elif kind == "ping":
            group.heartbeat()
        elif kind == "stop":
            return
        else:
            raise GroupFailed(f"tensor-parallel rank {group.rank}: unknown work {kind!r} from rank 0")
