"""The bookkeeping of one `distill` run, between the driver and the set format (`store`): the
run key that decides resume or refusal, the batches left to generate, what each process has of a
class, and the manifest assembled from them.

Kept apart from `store` (which reads and writes the files of a set) because none of it is a
file format: it is what one run knows about its own progress.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mgd3.version import __version__
from mgd3.io import store
from mgd3.methods import ClassInfo, Item, item_seed

log = logging.getLogger(__name__)

GRID_PER_CLASS = 10  # images per class row in grid.png

# DistillConfig fields that do not change an image: where the set goes, how progress shows,
# where it runs (a CPU and a GPU round differently, but moving a run is the user's call), how
# real images are batched and cached; data, model and classes enter the key resolved (below).
# Any other field, including ones added later, is part of the run key.
NOT_IN_RUN_KEY = ("out", "overwrite", "progress", "device", "cache_dir", "use_cache", "batch_size",
                  "encode_batch_size", "encode_workers", "strict", "data", "data_root", "class_map", "model", "classes", "threads")
# settings added after sets were made: in the run key only when set, so a run folder started before
# they existed resumes (with them unset it makes the same images)
IN_RUN_KEY_WHEN_SET = ("select_from",)
SAMPLER_IN_RUN_KEY_WHEN_SET = ("cfg_interval",)


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_key(spec, backend, data, order_dependent: bool) -> dict:
    """The resolved settings that determine the images (OUT/.mgd3-run.json), from the run's
    `RunSpec` (mgd3.run.spec): a re-run with the same key resumes, another key is refused. Batch
    size is not in it (an image has its own generator), except for methods whose images depend on
    earlier batches (`order_dependent`)."""
    config = spec.config
    key: dict = {"mgd3_version": __version__, "method": config.method, "ipc": config.ipc, "seed": config.seed,
                 "data": {"fingerprint": spec.data_fingerprint, "resolution": data.resolution,
                          "channels": data.channels},
                 "classes": [[c.class_id, c.label] for c in spec.classes],
                 "model": None if backend is None else {
                     "backend": backend.name, "fingerprint": spec.model_fingerprint,
                     "latent_shape": list(backend.latent_shape)}}
    for k, v in spec.resolved_config().items():
        if k not in NOT_IN_RUN_KEY and k not in key and not (k in IN_RUN_KEY_WHEN_SET and v is None):
            key[k] = v
    if isinstance(key.get("sampler"), dict):
        key["sampler"] = {k: v for k, v in key["sampler"].items() if not (k in SAMPLER_IN_RUN_KEY_WHEN_SET and v is None)}
    if order_dependent:
        key["batch_size"] = config.batch_size
    return key


def warn_resume_differences(out: Path, info: dict) -> None:
    before = (store.read_run(out) or {}).get("info", {})
    for name, flag in (("batch_size", "--batch-size"), ("device", "--device")):
        if name in before and before[name] != info[name]:
            log.warning("resuming %s with %s %s (it was started with %s): the remaining images can differ "
                        "from an uninterrupted run in the last float bits", out, flag, info[name], before[name])


class Work(NamedTuple):
    """One batch of a process's work: a shard an interrupted run finished (`items` None), or the
    items to generate (`shard` None)."""

    shard: dict | None
    items: list[Item] | None


class Assembled(NamedTuple):
    """The whole set, gathered in class order (`assemble`)."""

    records: list[dict]  # the manifest's image entries
    latents: torch.Tensor | None  # (N, C, h, w) float32, None for a method without latents
    grid_rows: list[np.ndarray]  # per class (n, R, R[, 3]) uint8, at most GRID_PER_CLASS


def batches_to_generate(classes: list[ClassInfo], ipc: int, seed: int, batch_size: int, out: Path,
                        resume: bool, order_dependent: bool) -> list[Work]:
    """The work of one process, class by class in index order: (shard, None) for a batch an
    interrupted run finished (its class under shard["cls"]), (None, items) for a batch to generate.
    Missing items of a class are batched in runs of batch_size from where they start, which
    reproduces the original batches. For an order-dependent method everything after the first
    missing item is generated again."""
    work: list[Work] = []

    def add_todo(items: list[Item]) -> None:
        work.extend(Work(None, items[i:i + batch_size]) for i in range(0, len(items), batch_size))

    for c in classes:
        shards = store.load_shards(out, c.index, c.class_id) if resume else {}
        todo: list[Item] = []
        k = 0
        while k < ipc:
            shard = shards.get(k)
            if shard is not None and not (order_dependent and todo) and shard["indices"][-1] < ipc:
                add_todo(todo)
                todo = []
                shard["cls"] = c
                work.append(Work(shard, None))
                k += len(shard["indices"])
            else:
                todo.append(Item(c, k, item_seed(seed, c.class_id, k)))
                k += 1
        add_todo(todo)
    resumed = sum(len(shard["indices"]) for shard, _ in work if shard is not None)
    if resumed:
        log.info("resuming: %d images kept from an interrupted run", resumed)
    return work


def image_record(item: Item, path: str, mode_id: int | None, extra: dict | None) -> dict:
    """One image's entry in the manifest (and in its batch's shard)."""
    rec = {"path": path, "class_id": item.cls.class_id, "class_index": item.cls.index,
           "label": item.cls.label, "index": item.index, "seed": item.seed, "mode_id": mode_id}
    if extra:
        rec.update(extra)
    return rec


def class_record(c: ClassInfo) -> dict:
    """One class's entry in the manifest."""
    return {"class_id": c.class_id, "name": c.name, "class_index": c.index, "label": c.label}


@dataclass
class ClassOutput:
    """What a process has of one class: manifest records, latent batches, grid images by index."""

    records: list[dict] = field(default_factory=list)
    latents: list[Tensor] = field(default_factory=list)
    grid: dict[int, Tensor] = field(default_factory=dict)

    def add(self, shard: dict) -> None:
        """Add one finished batch (a shard: records, latents or None, grid)."""
        self.records += shard["records"]
        if shard["latents"] is not None:
            self.latents.append(shard["latents"])
        self.grid.update(shard["grid"])


def make_shard(items: list[Item], paths: list[str], latents: Tensor | None, u8: np.ndarray,
               mode_ids: list | None, extra: list[dict] | None) -> dict:
    """The shard of a generated batch: its item indices, latents, manifest records, grid images."""
    mode_ids = mode_ids or [None] * len(items)
    records = [image_record(it, path, mode_ids[j], extra[j] if extra else None)
               for j, (it, path) in enumerate(zip(items, paths))]
    grid = {it.index: torch.from_numpy(np.ascontiguousarray(u8[j]))
            for j, it in enumerate(items) if it.index < GRID_PER_CLASS}
    return {"indices": [it.index for it in items], "latents": latents, "records": records, "grid": grid}


def merge_info(infos: list[dict]):
    """The method_info of several processes (each knows its own classes) as one: dicts are
    merged key by key; a dict keyed by class indices comes out in class order."""
    first = infos[0]
    if not all(isinstance(i, dict) for i in infos):
        return first
    keys = list(dict.fromkeys(k for i in infos for k in i))
    if keys and all(isinstance(k, str) and k.isdigit() for k in keys):
        keys.sort(key=int)
    return {k: merge_info([i[k] for i in infos if k in i]) for k in keys}


def assemble(classes: list[ClassInfo], outputs: dict[int, ClassOutput]) -> Assembled:
    """The whole set's records, latents and grid rows, in class order."""
    records, latents, rows = [], [], []
    for c in classes:
        entry = outputs.get(c.index, ClassOutput())
        records += entry.records
        latents += [x.float() for x in entry.latents]
        row = [entry.grid[k].numpy() for k in sorted(entry.grid)][:GRID_PER_CLASS]
        if row:
            rows.append(np.stack(row))
    return Assembled(records, (torch.cat(latents) if latents else None), rows)


def manifest(spec, backend, data, method_info, timing: dict, device: str, processes: int, resumed: int,
             records: list[dict]) -> dict:
    """manifest.json of a finished set, from the run's `RunSpec` (store adds the format)."""
    config = spec.config
    resolved = spec.resolved_config()
    resolved.update(model=str(backend.path) if backend is not None else None, device=device)
    return {
        "mgd3_version": __version__,
        "git_commit": git_commit(),
        "method": config.method,
        "ipc": config.ipc,
        "seed": config.seed,
        "data": {"name": config.data, "classes": config.classes, "data_root": config.data_root,
                 "resolution": config.save_resolution or data.resolution,
                 "channels": data.channels, "fingerprint": spec.data_fingerprint},
        "model": None if backend is None else {
            "path": str(backend.path), "fingerprint": spec.model_fingerprint, "backend": backend.name,
            "latent_shape": list(backend.latent_shape), "learned_sigma": backend.learned_sigma},
        "classes": [class_record(c) for c in spec.classes],
        "method_info": method_info,
        "config": resolved,
        "timing_s": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "device": device, "threads": torch.get_num_threads(), "processes": processes,
                    "resumed_images": resumed},
        "images": records,
    }
