"""torchrun coordination: the processes of one launch (`Ranks`) and how a failure in one of them
stops the others (`PeerFailed`). A single process (no WORLD_SIZE, or 1) never touches
torch.distributed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta

from mgd3.errors import Mgd3Error, first_line

log = logging.getLogger(__name__)


class PeerFailed(Mgd3Error):
    """Another process of the launch failed (it reports the error; this one exits quietly)."""

    reported = True


def classes_of_rank(classes: list, world: int, rank: int) -> list:
    """The classes process `rank` of `world` distills: class indices rank, rank + world, ... (every
    class once over the ranks, the same share however the run was interrupted)."""
    return [c for c in classes if c.index % world == rank]


class Ranks:
    """The processes of one torchrun launch (WORLD_SIZE, RANK, LOCAL_RANK in the environment), or
    a single process when WORLD_SIZE is absent or 1 (then torch.distributed is not touched).

    The process group (gloo: it carries only records and a few latents, CPU tensors, so it works
    the same with CUDA devices) gathers the results at the end. Failing fast goes through the
    rendezvous store: the first process to fail records its error there (compare-and-set, so one
    error line is reported, by that process); every other process checks the store after each
    batch and while it waits, and stops with a non-zero exit. A process that dies outright is
    torchrun's to notice: it stops the others."""

    POLL_S = 0.05

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, store=None):
        self.rank, self.world, self.local_rank, self.store = rank, world, local_rank, store

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        try:
            base, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=10)))
            dist.init_process_group("gloo", store=base, rank=rank, world_size=world,
                                    timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = first_line(e)
            raise Mgd3Error(f"cannot join the torchrun process group: {first}") from None
        if rank > 0:  # progress and info lines come from rank 0 only
            logging.getLogger("mgd3").setLevel(logging.WARNING)
        local = int(os.environ.get("LOCAL_RANK") or 0)
        return cls(rank, world, local, dist.PrefixStore("mgd3/", base))

    def close(self) -> None:
        if self.store is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.store = None

    def abort(self, e: BaseException) -> None:
        """Record this process's failure; the first failure of the launch is the one reported."""
        if self.store is None or isinstance(e, PeerFailed):
            return
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = text if isinstance(e, Mgd3Error) else f"{type(e).__name__}{': ' + text if text else ''}"
        payload = f"{self.rank}\n{msg}"
        try:
            first = self.store.compare_set("failed", "", payload) == payload.encode()
        except Exception:  # the store is gone: torchrun is tearing the launch down
            return
        if isinstance(e, Mgd3Error):
            if first:  # said here, before the others may exit and torchrun stops this process
                log.error("error: %s", msg)
            e.reported = True
        if first:
            self.store.set("reported", "1")

    def check(self) -> None:
        """Raise PeerFailed when another process of the launch failed."""
        if self.store is not None and self.store.check(["failed"]):
            rank, _, msg = self.store.get("failed").decode().partition("\n")
            deadline = time.monotonic() + 10  # let the failing process say why first
            while not self.store.check(["reported"]) and time.monotonic() < deadline:
                time.sleep(self.POLL_S)
            raise PeerFailed(f"process {rank} failed: {msg}")

    def wait_all(self, name: str) -> None:
        """A barrier that stops early when a process fails (and never times out on slow peers)."""
        if self.store is None:
            return
        self.store.set(f"{name}/{self.rank}", "1")
        keys = [f"{name}/{r}" for r in range(self.world)]
        while not self.store.check(keys):
            self.check()
            time.sleep(self.POLL_S)

    def share(self, name: str, value=None):
        """Rank 0's `value` (JSON) for every process; the others wait for it."""
        if self.store is None:
            return value
        if self.rank == 0:
            self.store.set(name, json.dumps(value))
            return value
        while not self.store.check([name]):
            self.check()
            time.sleep(self.POLL_S)
        return json.loads(self.store.get(name))

    def gather(self, obj) -> list | None:
        """Every process's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.store is None:
            return [obj]
        import torch.distributed as dist

        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts
