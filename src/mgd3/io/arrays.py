"""Real data held in memory as integer arrays: Fashion-MNIST from its IDX files and
scikit-learn's 8x8 digits (docs/METHODS.md §4). Each loader returns the selected classes' ids,
names, labels, targets and an `ArraySource` (`mgd3.io.data.DATASETS` registers them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.io.sources import ArraySource, keep_items, select_classes

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                       "Bag", "Ankle boot"]

_IDX_CACHE: dict[tuple, np.ndarray] = {}
IDX_MAX_BYTES = 16 + 60_000 * 28 * 28  # the largest Fashion-MNIST file (train images), decompressed


def read_idx(path: str | os.PathLike, ndim: int | None = None, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """A (gzipped) IDX file of unsigned bytes as a read-only uint8 array; corrupt, or (once
    decompressed) larger than `max_bytes` -> Mgd3Error."""
    path = Path(path)
    st = safeio.check_regular(path)
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key in _IDX_CACHE:
        return _IDX_CACHE[cache_key]
    try:
        if path.suffix == ".gz":
            raw = safeio.read_gzip(path, max_bytes, kind="Fashion-MNIST IDX file")
        else:
            raw = safeio.read_bytes(path, max_bytes, kind="Fashion-MNIST IDX file")
        if len(raw) < 4:
            raise ValueError("too short")
        zero, dtype, nd = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:  # 0x08: unsigned byte
            raise ValueError(f"bad magic number 0x{raw[:4].hex()}")
        if ndim is not None and nd != ndim:
            raise ValueError(f"{nd} dimensions, expected {ndim}")
        dims = struct.unpack(f">{nd}I", raw[4:4 + 4 * nd])
        arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd)
        if arr.size != int(np.prod(dims)):
            raise ValueError(f"{arr.size} bytes of data, the header says {int(np.prod(dims))}")
    except (OSError, EOFError, ValueError, zlib.error, struct.error) as e:
        raise Mgd3Error(f"{path} is corrupt or truncated, not a valid IDX file ({e})") from None
    arr = arr.reshape(dims)  # read-only view on the bytes: shared safely between datasets
    if len(_IDX_CACHE) >= 8:
        _IDX_CACHE.clear()
    _IDX_CACHE[cache_key] = arr
    return arr


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def fashion_mnist(split: str, classes=None, data_root=None) -> tuple:
    """Fashion-MNIST from the Debian IDX files (or MGD3_FASHION_MNIST_DIR); test = t10k."""
    root = Path(os.environ.get("MGD3_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    img_f, lab_f = _find_idx(root, f"{prefix}-images-idx3-ubyte"), _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if img_f is None or lab_f is None:
        raise Mgd3Error(f"Fashion-MNIST not found in {root} (install it with: apt-get install "
                        "dataset-fashion-mnist, or set MGD3_FASHION_MNIST_DIR)")
    images = read_idx(img_f, ndim=3)  # (N, 28, 28)
    labels = read_idx(lab_f, ndim=1)  # (N,)
    if len(images) != len(labels):
        raise Mgd3Error(f"{img_f} has {len(images)} images but {lab_f} has {len(labels)} labels")
    if labels.max(initial=0) >= len(FASHION_MNIST_NAMES):
        raise Mgd3Error(f"{lab_f} has labels outside 0..9")
    ids = [re.sub(r"[^A-Za-z0-9_-]+", "_", n) for n in FASHION_MNIST_NAMES]  # "T-shirt_top", "Ankle_boot"
    keep = select_classes(ids, FASHION_MNIST_NAMES, classes)
    rows, targets = keep_items(labels.astype(np.int64), keep, len(ids))
    key = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in (img_f, lab_f)])
    source = ArraySource(images[:, None], rows, 255.0, key)  # (N, 1, 28, 28) view, no copy
    return [ids[k] for k in keep], [FASHION_MNIST_NAMES[k] for k in keep], [None] * len(keep), targets, source


def digits(split: str, classes=None, data_root=None) -> tuple:
    """scikit-learn's 8x8 digits (values 0..16); a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                           stratify=d.target)
    items = np.sort(idx_train if split == "train" else idx_test)
    ids = [str(i) for i in range(10)]
    keep = select_classes(ids, ids, classes)
    rows, targets = keep_items(d.target[items].astype(np.int64), keep, len(ids))
    key = hashlib.sha256(images.tobytes() + d.target.astype(np.int64).tobytes()).hexdigest()
    source = ArraySource(images, items[rows], 16.0, key)
    return [ids[k] for k in keep], [ids[k] for k in keep], [None] * len(keep), targets, source

