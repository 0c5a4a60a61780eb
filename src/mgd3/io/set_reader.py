"""The distilled set read back from its folder (the layout `mgd3.io.store` writes): `DistilledSet`,
`load_set` (what `mgd3.load_set` returns) and `read_set`, the one reader of the format that
evaluate, report and quality use. Everything a manifest names is checked: image paths stay inside
the set, the manifest agrees with its files, latents are finite plain tensors, and paths outside
the set are read only when the user names them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.files import read_json_object
from mgd3.io.store import FORMAT_PREFIX, inside

MAX_IMAGE_PIXELS = 8192 * 8192  # a set image larger than this is refused before it is decoded


def named_outside(root: Path, value, what: str, flag: str) -> str | None:
    """A path a manifest names (`value`), for reading: None when unset; the value when it lies
    inside the set; else refused: mgd3 reads outside a set only what the user names (`flag`)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise Mgd3Error(f"{root}/manifest.json: {what} must be a non-empty string, got {str(value)[:60]!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else root / p
    try:
        real, base = p.resolve(), root.resolve()
    except (OSError, RuntimeError):
        real, base = None, None
    if real is not None and (real == base or base in real.parents):
        return str(real)
    raise Mgd3Error(f"{root}/manifest.json names {what} {value[:120]!r}, outside the set; mgd3 reads outside a "
                    f"set only what you name: pass {flag}")


def read_latents(root: Path) -> dict:
    """OUT/latents.pt checked: {"latents": (N, C, h, w) float32, finite, "paths": list, ...}; read
    with weights_only=True, a symlink out of the set refused, anything else one line."""
    f = inside(root, "latents.pt", "latents.pt")
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated, garbage, or a pickle that is not plain data)
        first = safeio.load_error(e)
        raise Mgd3Error(f"{f} is not a readable mgd3 latents file ({first})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("latents"), Tensor) \
            or obj["latents"].ndim < 2 or not obj["latents"].is_floating_point():
        raise Mgd3Error(f"{f} does not hold {{'latents': a float tensor (N, C, h, w), ...}}")
    if not isinstance(obj.get("paths", []), list):
        raise Mgd3Error(f"{f}: paths must be a list")
    why = safeio.view_problem(obj["latents"])
    if why:  # before .float() materialises it
        raise Mgd3Error(f"{f} {why}")
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
    from mgd3.images import open_image

    s = read_set(path, allow_image_folder=False)  # containment and consistency checked there
    arrays = []
    for f in s.files:
        try:
            with open_image(f) as im:  # a regular file within the pixel budget (mgd3.images)
                a = np.asarray(im)
        except OSError as e:
            raise Mgd3Error(f"cannot read image {f} of set {s.path} ({e})") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))  # (C, R, R)
    s.images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, dtype=torch.uint8)
    s.latents = read_latents(s.path)["latents"] if (s.path / "latents.pt").is_file() else None
    return s


def _check_pixels(f: Path) -> None:
    """A set image: a regular file whose header size is within MAX_IMAGE_PIXELS (`mgd3.images`)."""
    from mgd3.images import open_image

    with open_image(f, max_pixels=MAX_IMAGE_PIXELS):
        pass


def _int(v, what: str, where: Path) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise Mgd3Error(f"{where}: {what} must be an integer, got {str(v)[:40]!r}")
    return int(v)


def _read_image_folder(root: Path, subdirs: list[Path]) -> DistilledSet:
    """A plain ImageFolder whose sub-folders are the classes (sorted); IPC is the largest class."""
    from mgd3.io.folders import IMG_EXTENSIONS

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


def _manifest_entries(mf: Path, m: dict) -> tuple[list[str], list[str], list, list[str]]:
    """(class ids and names in class_index order, image paths, image class ids) of a manifest whose
    "classes" and "images" are non-empty lists of entries with the required keys."""
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
    return ids, names, rels, img_ids


def _manifest_ipc(mf: Path, m: dict, counts: np.ndarray, num_files: int) -> int:
    """The manifest's IPC, checked against the images per class (`counts`); without one, the
    largest class."""
    if "ipc" not in m:
        return int(counts.max())
    num_classes = len(counts)
    ipc = _int(m["ipc"], "ipc", mf)
    if ipc < 1:
        raise Mgd3Error(f"{mf}: ipc must be at least 1, got {ipc}")
    if num_files != num_classes * ipc or (counts != ipc).any():
        raise Mgd3Error(f"{mf} contradicts its files: ipc {ipc} × {num_classes} classes = {num_classes * ipc} images, "
                        f"but it lists {num_files} (per class {int(counts.min())}..{int(counts.max())})")
    return ipc


def read_set(path: str | os.PathLike, allow_image_folder: bool = True) -> DistilledSet:
    """THE reader of the distilled-set format (evaluate, report and quality use it): a set with
    manifest.json, or (allow_image_folder) a plain ImageFolder whose sub-folders are the classes.
    The manifest must agree with its files: every class listed once, every image of a listed
    class, inside the folder and present, IPC an integer with classes × IPC images."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise Mgd3Error(f"distilled set {root} does not exist or is not a folder")
    mf = root / "manifest.json"
    if not mf.is_file():
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not allow_image_folder or (root / "images").is_dir() or not subdirs:
            raise Mgd3Error(f"{root} is not a complete distilled set (no manifest.json)")
        return _read_image_folder(root, subdirs)
    m = read_manifest(root)
    ids, names, rels, img_ids = _manifest_entries(mf, m)
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
    ipc = _manifest_ipc(mf, m, np.bincount(targets, minlength=len(ids)), len(files))
    for f in files:
        _check_pixels(f)
    return DistilledSet(root, ids, names, files, targets, ipc, m)
