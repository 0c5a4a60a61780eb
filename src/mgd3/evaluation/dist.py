"""Stage: evaluation under torchrun — how `mgd3 evaluate` spreads its trainings over the
processes of a launch (`mgd3.run.ranks.Ranks`: WORLD_SIZE, RANK, LOCAL_RANK; one or several nodes).
The launch is made above this layer (the CLI and `mgd3.evaluate` call
`mgd3.run.ranks.launched`) and comes in as `ranks`; `ONE` stands for a single process.

Two modes, chosen by `plan` (or by `--dist-mode`):

* **seeds**: evaluation seed i (the i-th of `--seeds`) is trained by rank i mod W, whole, as
  one process trains it; rank 0 gathers the runs in seed order. The result equals the
  sequential run's bit for bit on the same device kind with the same threads per process.
* **ddp**: each seed is one DistributedDataParallel training over all W processes
  (`mgd3.evaluation.train.Shard`): the same global batch, each process a 1/W shard of it,
  gradients averaged by DDP. Accuracy matches the one-process run up to the floating-point
  order of the gradient sums (see docs/SCALE.md for the measured spread).

The auto rule: seeds when the seeds divide evenly over the processes (no gradient traffic,
every process busy the same time); otherwise ddp when every process gets at least
`MIN_SHARD` images of each global batch; otherwise seeds when there are at least as many seeds
as processes; otherwise ddp. A mode that would leave a process without work (seeds < W) or
without images (batch < W) is an error, never N copies of the same training.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

import torch

from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)

MODES = ("auto", "seeds", "ddp")
MIN_SHARD = 16  # images of a global batch per process below which DDP is all communication


class OneProcess:
    """A single process: what evaluation uses of `mgd3.run.ranks.Ranks` when there is no launch."""

    rank, world, local_rank = 0, 1, 0

    def check(self) -> None:
        pass

    def wait_all(self, name: str) -> None:
        pass

    def share(self, name: str, value=None):
        return value

    def broadcast(self, obj=None):
        return obj

    def gather(self, obj) -> list:
        return [obj]


ONE = OneProcess()


@dataclass(frozen=True)
class Plan:
    """How one evaluation's trainings are split over a launch."""

    mode: str  # "single" (no torchrun), "seeds" or "ddp"
    world: int
    reason: str
    seeds_by_rank: list[list[int]] = field(default_factory=list)  # seeds mode: what each rank trains

    def mine(self, rank: int, seeds: list[int]) -> list[int]:
        """Indices (into `seeds`) of the seeds this rank trains itself (seeds mode)."""
        return [i for i in range(len(seeds)) if i % self.world == rank]


def plan(requested: str, *, world: int, seeds: list[int], batch_size: int) -> Plan:
    """The mode for `world` processes, `seeds` and the protocol's (global) batch size."""
    if requested not in MODES:
        raise Mgd3Error(f"unknown --dist-mode {requested!r}; known: {', '.join(MODES)}")
    if world <= 1:
        return Plan("single", 1, "one process")
    s = len(seeds)
    by_rank = [[sd for i, sd in enumerate(seeds) if i % world == r] for r in range(world)]
    if requested == "seeds":
        if s < world:
            raise Mgd3Error(f"--dist-mode seeds needs at least one seed per process: {s} seed(s) for {world} "
                            "processes (give more --seeds, fewer processes, or --dist-mode ddp)")
        return Plan("seeds", world, "asked for (--dist-mode seeds)", by_rank)
    if requested == "ddp":
        if batch_size < world:
            raise Mgd3Error(f"--dist-mode ddp needs at least one image of each batch per process: batch "
                            f"{batch_size} for {world} processes (raise --batch-size or use fewer processes)")
        return Plan("ddp", world, "asked for (--dist-mode ddp)")
    if s % world == 0:
        return Plan("seeds", world, f"{s} seeds divide evenly over {world} processes", by_rank)
    if batch_size >= MIN_SHARD * world:
        return Plan("ddp", world, f"{s} seeds do not divide over {world} processes and the batch of "
                                  f"{batch_size} gives each at least {MIN_SHARD} images")
    if s >= world:
        return Plan("seeds", world, f"batch {batch_size} is under {MIN_SHARD} images per process", by_rank)
    if batch_size >= world:
        return Plan("ddp", world, f"fewer seeds ({s}) than processes ({world})")
    raise Mgd3Error(f"nothing to spread over {world} processes: {s} seed(s) and a batch of {batch_size} "
                    "(run fewer processes)")


def process_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """One GPU per process of a node: cuda -> cuda:LOCAL_RANK under torchrun."""
    if world > 1 and device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise Mgd3Error(f"process {local_rank} of this node has no GPU ({torch.cuda.device_count()} visible); "
                            "start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def gradient_group(device: torch.device):
    """The process group DDP reduces gradients over: NCCL for GPUs (a group made next to the
    launch's gloo group, which carries records and stops); the default gloo group on CPU."""
    if device.type != "cuda":
        return None
    import torch.distributed as dist

    return dist.new_group(backend="nccl")


def record(p: Plan, *, backend: str, per_rank: list[dict]) -> dict:
    """The `distributed` block of eval.json: how the work was split and where it ran."""
    d = {"world_size": p.world, "mode": p.mode, "why": p.reason, "backend": backend,
         "nodes": len({r["node"] for r in per_rank}),
         "ranks": per_rank}
    if p.mode == "seeds":
        d["seed_rule"] = "seed i of --seeds (0-based) is trained whole by rank i mod world_size"
    else:
        d["shard_rule"] = ("every rank draws the same global batch and augmentations from the seed; rank r trains "
                           "items r, r + world_size, ... of each batch (DistributedSampler's split); "
                           "DDP averages the gradients; the test split is scored in world_size chunks")
    return d


def rank_info(rank: int, local_rank: int, device: torch.device, seeds: list[int], seconds: float) -> dict:
    # GROUP_RANK: torchrun's node rank (its agents are the "nodes", also several on one host)
    return {"rank": rank, "node": int(os.environ.get("GROUP_RANK") or 0), "local_rank": local_rank,
            "host": socket.gethostname(), "device": str(device),
            "seeds": seeds, "train_seconds": round(seconds, 2)}
