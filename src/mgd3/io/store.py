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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.files import read_json_object, save_torch_atomic, to_uint8, write_atomic, write_text_atomic

FORMAT = "mgd3-distilled-set/1"
FORMAT_PREFIX = "mgd3-distilled-set/"  # any version of the format
MAX_IMAGE_PIXELS = 8192 * 8192  # a set image larger than this is refused before it is decoded
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
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and str(m.get("format", "")).startswith(FORMAT_PREFIX)


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
    if shard.get("latents") is not None:
        check_finite_batch(shard["latents"], [r["class_id"] for r in shard["records"]], "latents")
    folder = out / PARTIAL
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(shard, folder / shard_name(class_index, first, len(shard["indices"])))


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
            idx, recs = shard["indices"], shard["records"]
            ok = (isinstance(idx, list) and idx and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
                  and idx == list(range(idx[0], idx[0] + len(idx))) and idx[0] >= 0
                  and isinstance(recs, list) and len(recs) == len(idx) and isinstance(shard["grid"], dict))
            ok = ok and all(r["class_id"] == class_id and image_ok(inside(out, r["path"], f.name)) for r in recs)
            lat = shard["latents"]
            ok = ok and (lat is None or (isinstance(lat, Tensor) and len(lat) == len(idx)
                                         and bool(torch.isfinite(lat).all())))
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


def read_latents(root: Path) -> dict:
    """OUT/latents.pt checked: {"latents": (N, C, h, w) float32, finite, "paths": list, ...}; read
    with weights_only=True, a symlink out of the set refused, anything else one line."""
    f = inside(root, "latents.pt", "latents.pt")
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, garbage, or a pickle that is not plain data)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"{f} is not a readable mgd3 latents file ({first})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("latents"), Tensor) \
            or obj["latents"].ndim < 2 or not obj["latents"].is_floating_point():
        raise Mgd3Error(f"{f} does not hold {{'latents': a float tensor (N, C, h, w), ...}}")
    if not isinstance(obj.get("paths", []), list):
        raise Mgd3Error(f"{f}: paths must be a list")
    obj["latents"] = obj["latents"].float()
    if not bool(torch.isfinite(obj["latents"]).all()):
        raise Mgd3Error(f"{f} holds NaN or inf latents")
    return obj


def read_manifest(out: str | os.PathLike) -> dict:
    f = Path(out) / "manifest.json"
    if not f.is_file():
        raise Mgd3Error(f"{out} is not a complete distilled set (no manifest.json)")
    m = read_json_object(f, "manifest", max_bytes=1 << 30)
    if not str(m.get("format", "")).startswith(FORMAT_PREFIX):
        raise Mgd3Error(f"{f} is not an mgd3 distilled-set manifest (format {str(m.get('format'))[:40]!r})")
    return m


@dataclass(repr=False, eq=False)
class DistilledSet:
    """A distilled set read from its folder (README, "What a run writes"); one class for the
    Python API (`mgd3.load_set`) and for every reader inside mgd3 (evaluate, report, DM's --init).
    Every path is checked to lie inside `path`. One vocabulary: `class_index` is the position in
    `class_ids` (= torchvision ImageFolder's index), `model_labels` the model's class labels."""

    path: Path
    class_ids: list[str]
    class_names: list[str]
    files: list[Path]  # resolved, inside `path`
    class_index: np.ndarray  # (N,) int64 index into class_ids
    ipc: int
    manifest: dict | None  # None for a plain ImageFolder
    images: Tensor | None = None  # (N, C, R, R) uint8 as written; read by `load_set`
    latents: Tensor | None = None  # (N, c, h, w) float32 from latents.pt, when the method has latents
    summary: Mapping | None = None  # the run's `DistillResult`, for a set `distill` just wrote

    def __len__(self) -> int:
        return len(self.class_index)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.images.shape[1:])) if self.images is not None else "not loaded"
        method = (self.manifest or {}).get("method", "image folder")
        return (f"DistilledSet({str(self.path)!r}, {len(self)} images of {shape}, {len(self.class_ids)} classes, "
                f"IPC {self.ipc}, method {method!r}{', latents' if self.latents is not None else ''})")

    @property
    def labels(self) -> Tensor:
        """(N,) int64 class index of every image (`class_index` as a tensor)."""
        return torch.as_tensor(self.class_index, dtype=torch.int64)

    @property
    def targets(self) -> np.ndarray:
        """`class_index` (the name torchvision data sets use)."""
        return self.class_index

    @property
    def data(self) -> dict:
        d = (self.manifest or {}).get("data")
        return d if isinstance(d, dict) else {}

    @property
    def model_labels(self) -> Tensor:
        """(N,) the model's class label of every image (e.g. the ImageNet index for DiT-XL/2)."""
        return torch.as_tensor([r["label"] for r in (self.manifest or {}).get("images", [])], dtype=torch.int64)


def load_set(path: str | os.PathLike) -> DistilledSet:
    """Read the distilled set mgd3 wrote to `path` with its images as one uint8 tensor (and the
    latents, when written): what `mgd3.load_set` returns."""
    s = read_set(path, allow_image_folder=False)  # containment and consistency checked there
    arrays = []
    for f in s.files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im)
        except OSError as e:
            raise Mgd3Error(f"cannot read image {f} of set {s.path} ({e})") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))  # (C, R, R)
    s.images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, dtype=torch.uint8)
    s.latents = read_latents(s.path)["latents"] if (s.path / "latents.pt").is_file() else None
    return s


def _check_pixels(f: Path) -> None:
    try:
        with Image.open(f) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001  (not an image: said where it is read)
        raise Mgd3Error(f"{f} is not a readable image") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise Mgd3Error(f"{f} is {w}x{h} pixels, more than mgd3 reads for a set image ({MAX_IMAGE_PIXELS} pixels)")


def _int(v, what: str, where: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise Mgd3Error(f"{where}: {what} must be an integer, got {str(v)[:40]!r}")
    return int(v)


def read_set(path: str | os.PathLike, allow_image_folder: bool = True) -> DistilledSet:
    """THE reader of the distilled-set format (evaluate, report and quality use it): a set with
    manifest.json, or (allow_image_folder) a plain ImageFolder whose sub-folders are the classes.
    The manifest must agree with its files: every class listed once, every image of a listed
    class, inside the folder and present, IPC an integer with classes × IPC images."""
    from mgd3.io.data import IMG_EXTENSIONS

    root = Path(path).expanduser()
    if not root.is_dir():
        raise Mgd3Error(f"distilled set {root} does not exist or is not a folder")
    mf = root / "manifest.json"
    if not mf.is_file():
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not allow_image_folder or (root / "images").is_dir() or not subdirs:
            raise Mgd3Error(f"{root} is not a complete distilled set (no manifest.json)")
        files, targets = [], []
        for c, d in enumerate(subdirs):  # plain ImageFolder: classes = sorted sub-folders
            fs = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS and f.is_file())
            fs = [inside(root, f.relative_to(root).as_posix(), "images") for f in fs]
            files += fs
            targets += [c] * len(fs)
        if not files:
            raise Mgd3Error(f"{root} has no images in its class folders")
        for f in files:
            _check_pixels(f)
        counts = np.bincount(targets, minlength=len(subdirs))
        ids = [d.name for d in subdirs]
        return DistilledSet(root, ids, ids, files, np.asarray(targets, dtype=np.int64), int(counts.max()), None)
    m = read_manifest(root)
    classes, images = m.get("classes"), m.get("images")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, dict) for c in classes):
        raise Mgd3Error(f"{mf}: \"classes\" must be a non-empty list of class entries")
    if not isinstance(images, list) or not images or not all(isinstance(im, dict) for im in images):
        raise Mgd3Error(f"{mf}: \"images\" must be a non-empty list of image entries")
    try:
        order = sorted(range(len(classes)), key=lambda i: _int(classes[i].get("class_index", i), "class_index", mf))
        classes = [classes[i] for i in order]
        ids = [str(c["class_id"]) for c in classes]
        names = [str(c.get("name", c["class_id"])) for c in classes]
        rels = [im["path"] for im in images]
        img_ids = [str(im["class_id"]) for im in images]
    except KeyError as e:
        raise Mgd3Error(f"{mf} lacks a required entry ({e})") from None
    if len(set(ids)) != len(ids):
        raise Mgd3Error(f"{mf}: a class is listed twice")
    pos = {cid: i for i, cid in enumerate(ids)}
    stray = [cid for cid in img_ids if cid not in pos]
    if stray:
        raise Mgd3Error(f"{mf}: an image of class {stray[0][:40]!r}, which the manifest does not list")
    targets = np.asarray([pos[cid] for cid in img_ids], dtype=np.int64)
    files = [inside(root, r) for r in rels]
    if len(set(files)) != len(files):
        raise Mgd3Error(f"{mf}: an image is listed twice")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise Mgd3Error(f"{root}: {len(missing)} image(s) listed in manifest.json are missing, e.g. {missing[0]}")
    counts = np.bincount(targets, minlength=len(ids))
    if "ipc" in m:
        ipc = _int(m["ipc"], "ipc", mf)
        if ipc < 1:
            raise Mgd3Error(f"{mf}: ipc must be at least 1, got {ipc}")
        if len(files) != len(ids) * ipc or (counts != ipc).any():
            raise Mgd3Error(f"{mf} contradicts its files: ipc {ipc} × {len(ids)} classes = {len(ids) * ipc} images, "
                            f"but it lists {len(files)} (per class {int(counts.min())}..{int(counts.max())})")
    else:
        ipc = int(counts.max())
    for f in files:
        _check_pixels(f)
    return DistilledSet(root, ids, names, files, targets, ipc, m)
