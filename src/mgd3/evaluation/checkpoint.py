"""Stage: evaluation — per-epoch checkpoints of an evaluation training, so a killed run resumes.

One folder per result file and configuration: `<OUT dir>/.<OUT name>.ckpt/<key>/`, holding
`seed-<s>.pt` (the training state after an epoch: weights, optimizer, the batch-order /
augmentation generator and the CutMix numpy generator) and `seed-<s>.json` (a finished seed's
result). The key hashes everything the numbers depend on (protocol, set, test split,
normalisation, teacher, device kind, precision, the distributed mode and world size), so a
checkpoint is only ever continued by the run that wrote it. The state is restored exactly:
a resumed run gives the uninterrupted run's accuracies bit for bit (same device and threads).
The folder is removed once eval.json is written.

Files are read with `torch.load(weights_only=True)` (plain tensors, numbers and strings) and
any unreadable or foreign file is ignored with a warning: the seed is trained from scratch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from mgd3 import files
from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)


def folder_for(out: Path, key: str) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.ckpt" / key


class Checkpoint:
    """The checkpoint of one seed's training.

    `writer`: this process writes the files (in a DistributedDataParallel training every
    process holds the same state and only rank 0 writes). `share`: in such a training, rank 0's
    loaded state for every process (a broadcast; None in one process). `every_s`: at most one
    checkpoint per this many seconds of training (0: after every epoch); the state is the same
    whichever epochs are saved, so this changes no result. `poll`: see `due`."""

    def __init__(self, folder: Path, seed: int, key: str, *, every_s: float = 60.0, writer: bool = True,
                 share: Callable[[dict | None], dict | None] | None = None,
                 poll: Callable[[], None] | None = None):
        self.folder, self.seed, self.key = Path(folder), int(seed), key
        self.every_s, self.writer, self.share, self.poll = float(every_s), writer, share, poll
        self.path = self.folder / f"seed-{self.seed}.pt"
        self.result_path = self.folder / f"seed-{self.seed}.json"
        self._last = time.monotonic()

    # -- training state

    def load(self) -> dict | None:
        """The state after the last saved epoch, or None (start from scratch)."""
        state = self._read() if self.writer else None
        if self.share is not None:
            state = self.share(state)
        if state is not None:
            log.info("seed %d: resuming after epoch %d from %s", self.seed, state["epoch"], self.path)
        self._last = time.monotonic()
        return state

    def _read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            d = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(d, dict) or d.get("key") != self.key:
                raise ValueError("written by another configuration")
            if not isinstance(d.get("epoch"), int) or d["epoch"] < 1:
                raise ValueError("no epoch count")
            return d
        except Exception as e:  # noqa: BLE001  (an unreadable checkpoint is never fatal: train again)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("ignoring checkpoint %s (%s); seed %d starts from scratch", self.path, first, self.seed)
            return None

    def due(self) -> bool:
        """Called after every epoch: time for a checkpoint? (`poll` first: it raises when another
        process of the launch failed, so a long training stops soon.)"""
        if self.poll is not None:
            self.poll()
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        """Write the state after an epoch (atomically: a kill leaves the previous checkpoint)."""
        self._last = time.monotonic()
        if self.writer:
            self._write(lambda: files.save_torch_atomic({**state, "key": self.key}, self.path), self.path)

    @staticmethod
    def _write(fn, path: Path) -> None:
        try:
            fn()
        except OSError as e:
            raise Mgd3Error(f"cannot write the evaluation checkpoint {path}: {e.strerror or e}") from None

    # -- a finished seed

    def finished(self) -> dict | None:
        """The seed's result when a previous run of this configuration finished it."""
        if not self.result_path.is_file():
            return None
        try:
            d = json.loads(self.result_path.read_text()[:1_000_000])
            if not isinstance(d, dict) or d.get("key") != self.key or not isinstance(d.get("run"), dict):
                raise ValueError("written by another configuration")
            return d["run"]
        except (OSError, ValueError) as e:
            log.warning("ignoring %s (%s); seed %d is trained again", self.result_path, e, self.seed)
            return None

    def finish(self, run: dict) -> None:
        if self.writer:
            self._write(lambda: files.write_text_atomic(self.result_path, json.dumps({"key": self.key, "run": run})),
                        self.result_path)
            self.path.unlink(missing_ok=True)


def remove(folder: Path) -> None:
    """Drop a configuration's checkpoints (after eval.json is written), and the parent if empty."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()
    except OSError:
        pass
