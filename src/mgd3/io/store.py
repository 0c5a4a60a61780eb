"""Stage: the distilled set on disk.

    OUT/images/<NNN>-<class_id>/<index>.png  NNN = the class index, zero-padded: torchvision's
                                        ImageFolder sorts the folders into the manifest's order
    OUT/latents.pt                      {"latents": (N, C, h, w), "paths": [...], ...}
    OUT/grid.png                        a few images per class, one row per class named on the left
    OUT/manifest.json                   written last: its presence means the set is complete
    OUT/.mgd3-run.json                  the settings that determine the images (resume key)
    OUT/.partial/<class>-<first>-<n>.pt one per finished batch: its latents and records, so an
                                        interrupted run resumes with the missing images only

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written image or a manifest that claims a complete set. This module writes the set and keeps
the run folder (resume, shards, `--overwrite`); `mgd3.io.set_reader` reads a set back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.files import save_torch_atomic, to_uint8, write_atomic, write_text_atomic

FORMAT = "mgd3-distilled-set/1"
FORMAT_PREFIX = "mgd3-distilled-set/"  # any version of the format
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
        run = safeio.read_json(out / RUN_FILE, 16 << 20)
    except Mgd3Error:
        return None
    if not (isinstance(run, dict) and run.get("format") == RUN_FORMAT and isinstance(run.get("key", {}), dict)
            and isinstance(run.get("info", {}), dict)):
        return None
    return run


class OpenedRun(NamedTuple):
    """An output folder made ready for a run (`open_run`)."""

    path: Path
    state: str  # "new", "resume" or "complete"


def open_run(out: str | os.PathLike, overwrite: bool, key: dict, info: dict | None = None) -> OpenedRun:
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
            if run is None and not _is_set(out):
                raise Mgd3Error(f"--overwrite: {out} holds no mgd3 run or distilled set (no {RUN_FILE}, no mgd3 "
                                "manifest.json); mgd3 deletes only what it wrote; choose another --out")
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
    for name in ("images", PARTIAL):  # mgd3 writes only inside --out, never through a link
        if (out / name).is_symlink():
            raise Mgd3Error(f"{out / name} is a symbolic link; mgd3 writes only inside its output folder "
                            "(remove the link, use --overwrite, or choose another --out)")
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
    return OpenedRun(out, state)


def _is_set(out: Path) -> bool:
    """Whether `out` holds a distilled set mgd3 wrote (its manifest says the format)."""
    try:
        m = safeio.read_json(out / "manifest.json", 1 << 30)
    except Mgd3Error:
        return False
    return isinstance(m, dict) and str(m.get("format", "")).startswith(FORMAT_PREFIX)


_WRITTEN = {"images": re.compile(r"\d+\.png|\..+\.tmp"), PARTIAL: re.compile(r"\d{5}-\d{6}-\d{6}\.pt|\..+\.tmp")}


def _clear(out: Path) -> None:
    """Remove what mgd3 wrote in `out`, nothing else, and never through a symlink: a symlink at
    one of mgd3's names is removed itself (what it points to stays); inside images/ and .partial/
    only files named as mgd3 names them go (images/<class folder>/<index>.png, shards, its
    temporary files), so a user's images/NOTES.txt stays, with one warning."""
    # the manifest goes first so a crash mid-clean never leaves a set that looks complete
    kept: list[Path] = []
    for name in ("manifest.json",) + OUTPUTS:
        p = out / name
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
        elif p.is_dir():
            kept += _clear_folder(p, _WRITTEN.get(name), depth=1 if name == "images" else 0)
    if kept:
        log.warning("--overwrite left %d file(s) that mgd3 did not write, e.g. %s", len(kept), kept[0])


def _clear_folder(folder: Path, written: "re.Pattern | None", depth: int) -> list[Path]:
    """Remove mgd3's files from `folder` (`depth` levels of real sub-folders, as images/<class>/),
    then the folders left empty; returns the files kept."""
    kept = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            p.unlink()  # the link only
        elif p.is_dir() and depth > 0:
            kept += _clear_folder(p, written, depth - 1)
        elif p.is_file() and depth == 0 and written is not None and written.fullmatch(p.name):
            p.unlink()
        else:
            kept.append(p)
    if not kept:
        folder.rmdir()
    return kept


def shard_name(class_index: int, first: int, count: int) -> str:
    return f"{class_index:05d}-{first:06d}-{count:06d}.pt"


def save_shard(out: Path, class_index: int, first: int, shard: dict) -> None:
    """One finished batch of one class: {"indices", "latents" (n, C, h, w) or None, "records",
    "grid" {index: uint8 tensor} for the first images of the class}. Written after its images."""
    if shard.get("latents") is not None:
        check_finite_batch(shard["latents"], [r["class_id"] for r in shard["records"]], "latents")
    folder = out / PARTIAL
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(shard, folder / shard_name(class_index, first, len(shard["indices"])))


def image_ok(path: Path) -> bool:
    """Whether an image mgd3 wrote is still whole (a regular file, within the budget, decodable)."""
    from mgd3.images import image_problem

    return image_problem(path) is None


def load_shards(out: Path, class_index: int, class_id: str) -> dict[int, dict]:
    """{first index: shard} of the finished batches of a class whose images are all on disk
    and readable; a shard that fails that check is removed (its batch is generated again)."""
    shards = {}
    for f in sorted((out / PARTIAL).glob(f"{class_index:05d}-*.pt")):
        try:
            shard = torch.load(f, map_location="cpu", weights_only=True)
            idx, recs = shard["indices"], shard["records"]
            ok = (isinstance(idx, list) and idx and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
                  and idx == list(range(idx[0], idx[0] + len(idx))) and idx[0] >= 0
                  and isinstance(recs, list) and len(recs) == len(idx) and isinstance(shard["grid"], dict))
            ok = ok and all(r["class_id"] == class_id and image_ok(inside(out, r["path"], f.name)) for r in recs)
            lat = shard["latents"]
            ok = ok and (lat is None or (isinstance(lat, Tensor) and len(lat) == len(idx)
                                         and safeio.view_problem(lat) is None and bool(torch.isfinite(lat).all())))
        except Exception:  # a truncated or foreign file
            ok = False
        if ok:
            shards[shard["indices"][0]] = shard
        else:
            log.warning("%s: images missing or unreadable; generating that batch again", f.name)
            f.unlink(missing_ok=True)
    return shards


def check_finite_batch(x: Tensor, class_ids: list[str], what: str) -> None:
    """Stop before a generated batch with NaN or inf is written: a set of black images that looks
    complete is worse than no set."""
    bad = ~torch.isfinite(x.detach().float()).flatten(1).all(dim=1)  # (B,)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        cid = class_ids[first] if first < len(class_ids) else "?"
        raise Mgd3Error(f"the generated {what} of class {cid!r} hold NaN or inf ({int(bad.sum())} of {len(bad)} "
                        "in the batch): the model, its mgd3.json or the sampling options (--cfg, method options) "
                        "give non-finite values; nothing of this batch was written")


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


def write_images(out: Path, folders: list[str], indices: list[int], images: Tensor,
                 pixels: np.ndarray | None = None) -> list[str]:
    """Write images (B, C, R, R) in [-1, 1] to images/<folder>/<index>.png (`class_folder`);
    returns their paths relative to `out`. `pixels`: the images' `to_pixels` when the caller has
    them already. PNG encoding (zlib, which releases the GIL) runs on up to 8 threads; every file
    is written when this returns."""
    check_finite_batch(images, folders, "images")
    arrays = to_pixels(images) if pixels is None else pixels
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


def write_grid(path: Path, rows: list[np.ndarray], pad: int = 2, labels: list[str] | None = None) -> None:
    """rows: per class an array (n, R, R[, 3]) uint8; one row per class, its name on the left when
    `labels` are given, images under 64 px enlarged (nearest neighbour; `mgd3.grid`)."""
    if not rows:
        return
    from mgd3.io.grid import grid_image

    save_png(np.asarray(grid_image(rows, labels, pad=pad)), path)


def write_manifest(out: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, **manifest}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2, default=str))


def inside(root: Path, rel, what: str = "manifest.json") -> Path:
    """`root / rel` resolved, refused unless it stays inside `root` (no `..`, no absolute path,
    no symlink that leads out of the folder)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise Mgd3Error(f"{root}/{what}: an image path must be a non-empty string, got {str(rel)[:60]!r}")
    base = root.resolve()
    p = (root / rel)
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise Mgd3Error(f"{root}/{what}: image path {rel[:80]!r} leaves the set folder")
    try:
        real = p.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise Mgd3Error(f"{root}/{what}: image path {rel[:80]!r} cannot be resolved") from None
    if real != base and base not in real.parents:
        raise Mgd3Error(f"{root}/{what}: image path {rel[:80]!r} leads out of the set folder (symlink to {real})")
    return real


def refuse_out_inside_data(out, data: str) -> None:
    """An output folder inside the image folder being read would be read back as a class (or
    as images of one) by the next run: refused."""
    d = Path(str(data)).expanduser()
    if not d.is_dir():
        return  # a named dataset
    o, d = Path(out).expanduser().resolve(), d.resolve()
    if o == d or d in o.parents:
        raise Mgd3Error(f"--out {out} lies inside the data folder {data}; the next run would read it as data: "
                        "choose an output folder outside it")
