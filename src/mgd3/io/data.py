"""Stage: real data. Images as float tensors in [-1, 1] at the model's resolution and channels,
with integer class indices, stable class ids (output folder names), readable names and, where
known, the model label of each class.

Sources (docs/METHODS.md §4): Fashion-MNIST (Debian `dataset-fashion-mnist` IDX files) and
scikit-learn digits (`mgd3.io.arrays`), any image folder with class sub-folders (torchvision
ImageFolder convention) and the ImageNet subsets of the dataset-distillation literature
(ImageNette, ImageWoof, ImageIDC, ImageNet-100) read from an ImageNet-1K root (`mgd3.io.folders`,
their classes in `mgd3.io.imagenet_classes`). One transform for every source (`mgd3.io.sources`).

This module is the entry point: `load_data`, the `DATASETS` registry of named sources, `RealData`
(one split, its datasets and fingerprint) and class maps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.io.arrays import digits, fashion_mnist
from mgd3.io.folders import check_files, image_folder, imagenet_subset
from mgd3.io.imagenet_classes import IMAGEIDC, IMAGENET100, IMAGENETTE, IMAGENETTE_LABELS, IMAGEWOOF, IMAGEWOOF_LABELS
from mgd3.io.sources import ArraySource, FileSource
from mgd3.registry import Registry

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DEFAULT_FOLDER_RESOLUTION = 256


@dataclass(eq=False)
class RealData:
    """One split of a real data set, with the classes that were asked for, in that order."""

    name: str  # "fashion-mnist", "digits", "imagenette", ... or the folder path given
    split: str  # "train" or "test"
    class_ids: list[str]  # filesystem-safe ids (output folder names)
    class_names: list[str]  # readable names, else the id
    labels: list[int | None]  # model label per class where known
    targets: np.ndarray  # (N,) int64 class index into class_ids
    resolution: int
    channels: int
    _source: ArraySource | FileSource = field(repr=False, default=None)
    _identity: str = field(repr=False, default="")  # what names the data in the fingerprint

    def __len__(self) -> int:
        return len(self.targets)

    def indices(self, c: int) -> np.ndarray:
        """Item indices of class index c."""
        return np.flatnonzero(self.targets == c)

    def dataset(self, indices=None) -> Dataset:
        """Items (image float32 (C, R, R) in [-1, 1], class index), for all items or `indices`."""
        idx = np.arange(len(self.targets)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.targets)):
            raise IndexError(f"item index out of range 0..{len(self.targets) - 1}")
        return self._source.dataset(idx, self.targets, self.resolution, self.channels)

    def fingerprint(self) -> str:
        """Short hex that changes when the files, classes, resolution or channels change."""
        payload = [self._identity or self.name, self.split, self.class_ids, self.resolution, self.channels,
                   self._source.key]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


# A loader: (split, classes, data_root) -> (class ids, names, labels, targets, source), with only
# the selected classes, in the order asked for.
Loader = Callable[..., tuple]
DATASETS: Registry[Loader] = Registry("dataset")
DATASETS.add("fashion-mnist", fashion_mnist)
DATASETS.add("digits", digits)
DATASETS.add("imagenette", imagenet_subset("imagenette", IMAGENETTE, IMAGENETTE_LABELS))
DATASETS.add("imagewoof", imagenet_subset("imagewoof", IMAGEWOOF, IMAGEWOOF_LABELS))
DATASETS.add("imageidc", imagenet_subset("imageidc", IMAGEIDC, None))
DATASETS.add("imagenet100", imagenet_subset("imagenet100", IMAGENET100, None))


# --------------------------------------------------------------------------- class maps


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """A JSON object {class_id: label} or text lines 'CLASS_ID LABEL' (blank lines and # comments
    allowed; the id may contain spaces, the label is the last field)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise Mgd3Error(f"class map {p} does not exist")
    text = safeio.read_text(p, 64 << 20, f"class map {p}", "class map")

    def label(v, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise Mgd3Error(f"class map {p}, {where}: label {v!r} is not a non-negative integer")
        return v

    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        def pairs(items):
            seen = {}
            for k, v in items:
                if k in seen:
                    raise Mgd3Error(f"class map {p}: class {k!r} is given twice")
                seen[k] = v
            return seen

        try:
            obj = safeio.loads_json(text, f"class map {p}", object_pairs_hook=pairs, syntax_errors=True)
        except json.JSONDecodeError as e:
            raise Mgd3Error(f"class map {p}, line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise Mgd3Error(f"class map {p}: expected a JSON object {{class_id: label}}")
        return {str(k): label(v, f"class {k!r}") for k, v in obj.items()}
    out: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
            raise Mgd3Error(f"class map {p}, line {n}: expected 'CLASS_ID LABEL', got {line[:80]!r}")
        if len(parts[1]) > 18:
            raise Mgd3Error(f"class map {p}, line {n}: label of {len(parts[1])} digits is no class label")
        if parts[0] in out:
            raise Mgd3Error(f"class map {p}, line {n}: class {parts[0]!r} is given twice")
        out[parts[0]] = int(parts[1])
    return out


# --------------------------------------------------------------------------- entry point


def check_data_name(name: str) -> None:
    """A name `load_data` takes (a registered dataset, `NAME:/root`, or a path), else one line
    naming the known datasets and the image-folder alternative."""
    head, sep, _ = name.partition(":")
    if name in DATASETS or (sep and head in DATASETS):
        return
    if Path(name).expanduser().exists() or os.sep in name or name.startswith((".", "~")):
        return
    raise Mgd3Error(f"unknown dataset {name!r} (and no such folder); mgd3 knows {', '.join(DATASETS.names())}, "
                    "or give an image folder (one sub-folder of images per class)")


def load_data(name_or_path: str, split: str = "train", *, resolution: int | None = None,
              channels: int | None = None, classes: Sequence[str] | None = None,
              data_root: str | None = None, class_map: str | None = None, bad_files: str = "lazy",
              cache_dir: str | None = None) -> RealData:
    """A named dataset (`DATASETS`, also `imagenette:/path/to/imagenet`) or an image folder.

    resolution/channels None: the data's own (28/8 and 1 for Fashion-MNIST/digits; 256 and 3
    for folders). `classes`: ids, names or indices (as strings), order kept. `class_map`: a
    JSON or text file of model labels per class id (or name), overriding built-in labels.
    `bad_files` for image folders: "lazy" (a file is read when used; an unreadable one is an
    error then), "skip" (missing or unreadable files are left out, with one warning) or
    "strict" (the first one is an error now)."""
    if split not in SPLITS:
        raise Mgd3Error(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if channels not in (None, 1, 3):
        raise Mgd3Error(f"channels must be 1 or 3, got {channels}")
    if resolution is not None and (isinstance(resolution, bool) or int(resolution) != resolution
                                   or resolution < 1):
        raise Mgd3Error(f"resolution must be a positive integer, got {resolution}")
    name = str(name_or_path)
    head, sep, tail = name.partition(":")
    if sep and head in DATASETS:  # "imagenette:/path/to/imagenet"
        name, data_root = head, tail
    if name in DATASETS:
        ids, names, labels, targets, source = DATASETS.get(name)(split, classes=classes, data_root=data_root)
        identity = name
    elif Path(name).expanduser().exists() or os.sep in name or name.startswith((".", "~")):
        ids, names, labels, targets, source = image_folder(name, split, classes=classes)
        identity = "image-folder"  # content-addressed (file listing), not by where it lies
    else:
        check_data_name(name)
    if bad_files not in ("lazy", "skip", "strict"):
        raise ValueError(f"bad_files must be lazy, skip or strict, got {bad_files!r}")
    if isinstance(source, FileSource) and bad_files != "lazy":
        source, targets = check_files(source, targets, ids, strict=bad_files == "strict", cache_dir=cache_dir,
                                      resolution=resolution or DEFAULT_FOLDER_RESOLUTION)
    if class_map:
        mapping = read_class_map(class_map)
        labels = [mapping.get(i, mapping.get(n, lab)) for i, n, lab in zip(ids, names, labels)]
        if not (set(mapping) & (set(ids) | set(names))):
            log.warning("class map %s names none of the classes of %s (%s ...)", class_map, name, ids[0])
    data = RealData(name=name, split=split, class_ids=list(ids), class_names=list(names), labels=list(labels),
                    targets=targets, resolution=int(resolution or source.native_size or DEFAULT_FOLDER_RESOLUTION),
                    channels=int(channels or source.native_channels), _source=source, _identity=identity)
    log.info("%s %s: %d items, %d classes, %dx%d, %d channel(s)", name, split, len(data), len(ids),
             data.resolution, data.resolution, data.channels)
    return data
