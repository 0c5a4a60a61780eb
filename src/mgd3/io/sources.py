"""Real data: the one transform, the datasets a split's items become, and class selection.

One transform for every source: channel conversion (gray -> RGB by repeating, RGB -> gray by
luminance as PIL "L"), shorter side resized to R (bicubic, antialiased), centre crop R x R,
then [0, 1] -> [-1, 1]. Items already R x R skip the resize.

A source holds the items of a split (all classes that were selected) and builds datasets of
them; both kinds are plain picklable objects (DataLoader workers). Every loader (`mgd3.io.data`)
selects its classes with `select_classes`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mgd3.errors import Mgd3Error


def to_model_space(x: torch.Tensor, resolution: int, channels: int, scale: float = 255.0) -> torch.Tensor:
    """Integer or float images (B, C, H, W) with values in [0, scale] -> float32
    (B, channels, R, R) in [-1, 1]: channel conversion, shorter side resized to R (bicubic,
    antialiased), centre crop. A (C, H, W) input gives a (channels, R, R) output."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    single = x.dim() == 3
    x = x[None] if single else x
    x = x.float() / scale  # (B, C, H, W) in [0, 1]
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x[:, :3] * w).sum(1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        if min(h, w) != resolution:
            x = TF.resize(x, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = x.clamp(0, 1)  # bicubic overshoots
        x = TF.center_crop(x, resolution)
    x = (x * 2.0 - 1.0).contiguous()  # (B, channels, R, R)
    return x[0] if single else x


class ArrayDataset(Dataset):
    """Items of an in-memory integer array; item j is image `rows[j]` of `images` (M, C, H, W)
    with values 0..scale. `__getitems__` converts a whole batch at once (DataLoader fast path)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, scale: float,
                 resolution: int, channels: int):
        self.images, self.rows, self.targets, self.scale = images, rows, targets, scale
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        x = torch.from_numpy(np.array(self.images[self.rows[j]]))  # (C, H, W), a writable copy
        return to_model_space(x, self.resolution, self.channels, self.scale), int(self.targets[j])

    def __getitems__(self, js: Sequence[int]) -> list:
        js = np.asarray(js, dtype=np.int64)
        x = to_model_space(torch.from_numpy(self.images[self.rows[js]]), self.resolution, self.channels,
                           self.scale)  # (B, channels, R, R)
        return list(zip(x, self.targets[js].tolist()))


class FileDataset(Dataset):
    """Items of image files; an unreadable file is a one-line Mgd3Error naming it."""

    def __init__(self, files: Sequence[str], targets: np.ndarray, resolution: int, channels: int):
        self.files, self.targets = files, targets
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j: int):
        return to_model_space(read_image(self.files[j], self.channels, self.resolution), self.resolution,
                              self.channels), \
            int(self.targets[j])


def read_image(path: str | os.PathLike, channels: int, resolution: int | None = None) -> torch.Tensor:
    """An image file as uint8 (channels, H, W); PIL does the channel conversion. Its size is
    checked before decoding, against a pixel budget and what resizing to `resolution` would
    allocate (`mgd3.images`); an unreadable file is a one-line Mgd3Error naming it."""
    from mgd3.images import read_image as read

    return read(path, channels, resolution)


class ArraySource:
    """Items that are rows of an in-memory integer array (values 0..scale)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, scale: float, key: str):
        self.images, self.rows, self.scale, self.key = images, rows, scale, key
        self.native_size = images.shape[-1] if images.shape[-1] == images.shape[-2] else None
        self.native_channels = images.shape[1]

    def dataset(self, idx: np.ndarray, targets: np.ndarray, resolution: int, channels: int) -> Dataset:
        return ArrayDataset(self.images, self.rows[idx], targets[idx], self.scale, resolution, channels)


class FileSource:
    """Items that are image files; `key` names the file listing (the data's fingerprint)."""

    def __init__(self, files: list[str], key: str):
        self.files, self.key = files, key
        self.native_size, self.native_channels = None, 3

    def dataset(self, idx: np.ndarray, targets: np.ndarray, resolution: int, channels: int) -> Dataset:
        return FileDataset([self.files[i] for i in idx], targets[idx], resolution, channels)


def select_classes(all_ids: Sequence[str], all_names: Sequence[str], classes: Sequence[str] | None) -> list[int]:
    """Positions of the requested classes, in the order given. Each entry is a class id, a class
    name, a class index, or (if unique) one comma-separated part of a name, case-insensitive."""
    if classes is None or (not isinstance(classes, (str, int)) and len(classes) == 0):
        return list(range(len(all_ids)))  # None or [] : every class
    if isinstance(classes, (str, int)):
        classes = [classes]
    out: list[int] = []
    for want in classes:
        w = str(want).strip()
        if w in all_ids:
            pos = all_ids.index(w)
        elif w in all_names:
            pos = list(all_names).index(w)
        elif w.isdigit() and int(w) < len(all_ids):
            pos = int(w)
        else:
            low = w.lower()
            hits = [i for i, n in enumerate(all_names)
                    if low == all_ids[i].lower() or low in {p.strip().lower() for p in [n, *n.split(",")]}]
            if len(hits) != 1:
                raise Mgd3Error(f"unknown class {w!r}; available class ids: {', '.join(all_ids)}")
            pos = hits[0]
        if pos in out:
            raise Mgd3Error(f"class {w!r} is given twice (as {all_ids[pos]!r})")
        out.append(pos)
    return out


def keep_items(targets: np.ndarray, keep: list[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Items of the classes `keep` (in item order) and their new class indices 0..len(keep)-1."""
    remap = np.full(num_classes, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    new = remap[targets]
    rows = np.flatnonzero(new >= 0)
    return rows, new[rows]
