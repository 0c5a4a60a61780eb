"""Stage: the distilled set on disk.

    OUT/images/<NNN>-<class_id>/<index>.png  NNN = the class index, zero-padded: torchvision's
                                        ImageFolder sorts the folders into the manifest's order
    OUT/latents.pt                      {"latents": (N, C, h, w), "paths": [...], ...}
    OUT/grid.png                        a few images per class, one row per class
    OUT/manifest.json                   written last: its presence means the set is complete
    OUT/.mgd3-run.json                  the settings that determine the images (resume key)
    OUT/.partial/<class>-<first>-<n>.pt one per finished batch: its latents and records, so an
                                        interrupted run resumes with the missing images only

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written image or a manifest that claims a complete set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.files import save_torch_atomic, to_uint8, write_atomic, write_text_atomic

FORMAT = "mgd3-distilled-set/1"
RUN_FORMAT = "mgd3-run/1"
RUN_FILE = ".mgd3-run.json"
PARTIAL = ".partial"
OUTPUTS = ("images", "latents.pt", "grid.png", "manifest.json", PARTIAL, RUN_FILE)

log = logging.getLogger(__name__)


def _flat(d, prefix: str = "") -> dict:
    """{"sampler": {"steps": 50}} -> {"sampler.steps": 50} (lists stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def first_difference(old: dict, new: dict) -> str | None:
    """The first field (dotted, in `new`'s order) whose value differs, or None."""
    a, b = _flat(old), _flat(new)
    for k in list(b) + [k for k in a if k not in b]:
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            return k
    return None


def read_run(out: Path) -> dict | None:
    """The run file of an output folder, or None when there is none (or it is unreadable)."""
    try:
        run = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("format") == RUN_FORMAT else None


def open_run(out: str | os.PathLike, overwrite: bool, key: dict, info: dict | None = None) -> tuple[Path, str]:
    """Prepare the output folder of a run whose images are determined by `key`; returns
    (folder, state) with state "new", "resume" (the same settings, unfinished: keep what is
    there) or "complete" (the same settings, manifest.json present: nothing to do).

    A folder holding another run (a different key) or other files is refused unless `overwrite`,
    which clears mgd3's outputs and starts afresh."""
    key = json.loads(json.dumps(key, default=str))  # as it reads back (tuples -> lists)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"output {out} exists and is not a folder")
    state = "new"
    if out.is_dir() and any(out.iterdir()):
        run = read_run(out)
        if overwrite:
            _clear(out)
        elif run is None:
            raise Mgd3Error(f"output folder {out} is not empty and holds no unfinished mgd3 run "
                            "(use --overwrite to replace it, or another --out)")
        else:
            diff = first_difference(run.get("key", {}), key)
            if diff is not None:
                old, new = _flat(run.get("key", {})).get(diff, "<unset>"), _flat(key).get(diff, "<unset>")
                raise Mgd3Error(f"output folder {out} holds a run with other settings ({diff}: {old!r} there, "
                                f"{new!r} now); use --overwrite to replace it, or another --out")
            state = "complete" if (out / "manifest.json").is_file() else "resume"
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        probe = out / ".mgd3-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise Mgd3Error(f"cannot write to output folder {out} ({e.strerror or e})") from None
    if state == "resume":
        for tmp in [*out.glob(".*.tmp"), *out.glob("images/*/.*.tmp"), *out.glob(f"{PARTIAL}/.*.tmp")]:
            tmp.unlink(missing_ok=True)  # left by a killed run
    if state == "new":
        write_text_atomic(out / RUN_FILE, json.dumps({"format": RUN_FORMAT, "key": key, "info": info or {}}, indent=2))
    return out, state


def _clear(out: Path) -> None:
    # the manifest goes first so a crash mid-clean never leaves a set that looks complete
    for name in ("manifest.json",) + OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def shard_name(class_index: int, first: int, count: int) -> str:
    return f"{class_index:05d}-{first:06d}-{count:06d}.pt"


def save_shard(out: Path, class_index: int, first: int, shard: dict) -> None:
    """One finished batch of one class: {"indices", "latents" (n, C, h, w) or None, "records",
    "grid" {index: uint8 tensor} for the first images of the class}. Written after its images."""
    folder = out / PARTIAL
    folder.mkdir(parents=True, exist_ok=True)
    save_torch(shard, folder / shard_name(class_index, first, len(shard["indices"])))


def image_ok(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # missing, truncated, not an image
        return False


def load_shards(out: Path, class_index: int, class_id: str) -> dict[int, dict]:
    """{first index: shard} of the finished batches of a class whose images are all on disk
    and readable; a shard that fails that check is removed (its batch is generated again)."""
    shards = {}
    for f in sorted((out / PARTIAL).glob(f"{class_index:05d}-*.pt")):
        try:
            shard = torch.load(f, map_location="cpu", weights_only=True)
            ok = all(r["class_id"] == class_id and image_ok(out / r["path"]) for r in shard["records"])
        except Exception:  # a truncated or foreign file
            ok = False
        if ok:
            shards[shard["indices"][0]] = shard
        else:
            log.warning("%s: images missing or unreadable; generating that batch again", f.name)
            f.unlink(missing_ok=True)
    return shards


def remove_partial(out: Path) -> None:
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


def to_pixels(images: Tensor) -> np.ndarray:
    """(B, C, R, R) in [-1, 1] -> (B, R, R) or (B, R, R, 3) uint8 arrays, as PNGs hold them."""
    x = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # (B, R, R, C)
    return x[..., 0] if x.shape[-1] == 1 else x


def save_png(array: np.ndarray, path: Path) -> None:
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _writers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def class_folder(class_index: int, class_id: str, num_classes: int) -> str:
    """The folder of a class under OUT/images: "003-n01530575". The index, zero-padded to one
    width (at least 3 digits), makes sorted folder names (torchvision ImageFolder's class_to_idx)
    follow the class indices of the manifest whatever the class ids are."""
    width = max(3, len(str(max(num_classes - 1, 0))))
    return f"{class_index:0{width}d}-{class_id}"


def write_images(out: Path, folders: list[str], indices: list[int], images: Tensor) -> list[str]:
    """Write images (B, C, R, R) in [-1, 1] to images/<folder>/<index>.png (`class_folder`);
    returns their paths relative to `out`. PNG encoding (zlib, which releases the GIL) runs on up
    to 8 threads; every file is written when this returns."""
    arrays = to_pixels(images)
    paths = [f"images/{folder}/{k}.png" for folder, k in zip(folders, indices)]
    for rel in dict.fromkeys(str(Path(r).parent) for r in paths):
        (out / rel).mkdir(parents=True, exist_ok=True)
    workers = min(_writers(), len(paths))
    if workers <= 1:
        for rel, arr in zip(paths, arrays):
            save_png(arr, out / rel)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="mgd3-png") as pool:
            list(pool.map(lambda pa: save_png(pa[1], out / pa[0]), zip(paths, arrays)))  # re-raises
    return paths


def write_grid(path: Path, rows: list[np.ndarray], pad: int = 2) -> None:
    """rows: per class an array (n, R, R[, 3]) uint8; one row per class, padded to the widest."""
    if not rows:
        return
    n = max(len(r) for r in rows)
    r0 = rows[0]
    h, w = r0.shape[1:3]
    color = r0.ndim == 4
    shape = (len(rows) * (h + pad) + pad, n * (w + pad) + pad) + ((3,) if color else ())
    grid = np.full(shape, 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = img
    save_png(grid, path)


def save_torch(obj, path: Path) -> None:
    save_torch_atomic(obj, path)


def write_manifest(out: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, **manifest}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2, default=str))


def read_manifest(out: str | os.PathLike) -> dict:
    f = Path(out) / "manifest.json"
    if not f.is_file():
        raise Mgd3Error(f"{out} is not a complete distilled set (no manifest.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise Mgd3Error(f"{f} is not valid JSON ({e.msg})") from None
