"""Stage: real data. Images as float tensors in [-1, 1] at the model's resolution and channels,
with integer class indices, stable class ids (output folder names), names and, where known,
the model label of each class.

Sources: Fashion-MNIST (Debian `dataset-fashion-mnist` IDX files), scikit-learn digits, any
image folder with class sub-folders (torchvision ImageFolder convention), and the ImageNet
subsets of the dataset-distillation literature read from an ImageNet-1K root.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from mgd3.errors import Mgd3Error
from mgd3.registry import Registry

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                       "Bag", "Ankle boot"]

# ImageNet subsets (SPEC §4). DiT label = index of the wnid among the sorted ImageNet-1K wnids.
IMAGENETTE = ("n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 "
              "n03445777 n03888257").split()
IMAGENETTE_LABELS = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
IMAGENETTE_NAMES = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                    "garbage truck", "gas pump", "golf ball", "parachute"]
IMAGEWOOF = ("n02096294 n02093754 n02111889 n02088364 n02086240 n02089973 n02087394 n02115641 "
             "n02099601 n02105641").split()
IMAGEWOOF_LABELS = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
IMAGENET100 = """n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245
n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 n02877765
n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 n03785016 n03764736
n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888
n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 n03017168
n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 n02089867 n02119022 n03777754
n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 n03494278 n04136333 n03794056 n03492542 n02018207
n04067472 n03930630 n03584829 n02123045 n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089
n03424325 n01855672 n02090622""".split()
WNID_NAMES = dict(zip(IMAGENETTE, IMAGENETTE_NAMES))


# --------------------------------------------------------------------------- transforms


def to_model_space(img: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """uint8 or [0,1] float (C, H, W) -> float32 (channels, R, R) in [-1, 1]: shorter side resized
    to R (bicubic, antialiased), centre crop, channel conversion (repeat / luminance)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    c = x.shape[0]
    if c != channels:
        if channels == 3:
            x = x.expand(3, *x.shape[1:])
        else:
            w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # PIL "L" luminance
            x = (x[:3] * w).sum(0, keepdim=True)
    h, w = x.shape[1:]
    if (h, w) != (resolution, resolution):
        if min(h, w) != resolution:
            x = TF.resize(x, resolution, interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, resolution)
    return (x.clamp(0, 1) * 2.0 - 1.0).contiguous()


class ArrayDataset(Dataset):
    """Items of an in-memory uint8 array (N, C, H, W)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, indices: np.ndarray, resolution: int, channels: int):
        self.images, self.targets, self.indices = images, targets, indices
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j):
        i = int(self.indices[j])
        x = to_model_space(torch.from_numpy(self.images[i]), self.resolution, self.channels)
        return x, int(self.targets[i])


class FileDataset(Dataset):
    """Items of image files; a corrupt file is a one-line Mgd3Error naming it."""

    def __init__(self, files: list[Path], targets: np.ndarray, indices: np.ndarray, resolution: int, channels: int):
        self.files, self.targets, self.indices = files, targets, indices
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j):
        from torchvision.transforms.functional import pil_to_tensor

        i = int(self.indices[j])
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise Mgd3Error(f"cannot read image {self.files[i]} ({type(e).__name__})") from None
        return to_model_space(pil_to_tensor(im), self.resolution, self.channels), int(self.targets[i])


# --------------------------------------------------------------------------- RealData


@dataclass
class RealData:
    name: str
    split: str
    class_ids: list[str]
    class_names: list[str]
    labels: list[int | None]
    targets: np.ndarray  # (N,) int64
    resolution: int
    channels: int
    _make: Callable[[np.ndarray], Dataset] = field(repr=False, default=None)
    _source_key: str = field(repr=False, default="")

    def __len__(self) -> int:
        return len(self.targets)

    def indices(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.targets == c)

    def dataset(self, indices=None) -> Dataset:
        idx = np.arange(len(self.targets)) if indices is None else np.asarray(indices, dtype=np.int64)
        return self._make(idx)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.split, self.class_ids, self.resolution, self.channels,
                             self._source_key]).encode())
        return h.hexdigest()[:16]


DATASETS: Registry[Callable[..., RealData]] = Registry("dataset")


def _stat_key(paths: Sequence[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root) if root else p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _select(all_ids: list[str], all_names: list[str], classes: Sequence[str] | None) -> list[int]:
    """Positions of the requested classes (ids, names or indices), in the order given."""
    if not classes:
        return list(range(len(all_ids)))
    out = []
    for want in classes:
        w = str(want)
        if w in all_ids:
            pos = all_ids.index(w)
        elif w in all_names:
            pos = all_names.index(w)
        elif w.isdigit() and int(w) < len(all_ids):
            pos = int(w)
        else:
            raise Mgd3Error(f"unknown class {w!r}; available: {', '.join(all_ids)}")
        if pos in out:
            raise Mgd3Error(f"class {w!r} is given twice")
        out.append(pos)
    return out


def _subset(images_or_files, targets: np.ndarray, keep: list[int]):
    """Keep the items of classes `keep`, re-indexed 0..len(keep)-1 in that order."""
    remap = np.full(max(int(targets.max()) + 1, max(keep) + 1), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    new = remap[targets]
    sel = np.flatnonzero(new >= 0)
    return sel, new[sel]


# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("bad magic number")
        dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(dims)):
            raise ValueError("truncated")
        return arr.reshape(dims).copy()
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise Mgd3Error(f"{path} is not a valid gzipped IDX file ({e})") from None


@DATASETS.register("fashion-mnist")
def fashion_mnist(split: str, resolution, channels, classes, **_) -> RealData:
    root = Path(os.environ.get("MGD3_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    img_f, lab_f = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_f.is_file() or not lab_f.is_file():
        raise Mgd3Error(f"Fashion-MNIST not found in {root} (install it with: apt-get install "
                        "dataset-fashion-mnist, or set MGD3_FASHION_MNIST_DIR)")
    images = _read_idx(img_f)[:, None]  # (N, 1, 28, 28)
    targets = _read_idx(lab_f).astype(np.int64)
    if len(images) != len(targets):
        raise Mgd3Error(f"{img_f} and {lab_f} disagree on the number of items")
    ids = [n.replace("/", "_").replace(" ", "_") for n in FASHION_MNIST_NAMES]
    return _array_data("fashion-mnist", split, images, targets, ids, FASHION_MNIST_NAMES, resolution or 28,
                       channels or 1, classes, _stat_key([img_f, lab_f]))


@DATASETS.register("digits")
def digits(split: str, resolution, channels, classes, **_) -> RealData:
    """scikit-learn's 8x8 digits; a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                           stratify=d.target)
    idx = np.sort(idx_train if split == "train" else idx_test)
    ids = [str(i) for i in range(10)]
    return _array_data("digits", split, images[idx], d.target[idx].astype(np.int64), ids, ids,
                       resolution or 8, channels or 1, classes, "sklearn-digits")


def _array_data(name, split, images, targets, ids, names, resolution, channels, classes, key) -> RealData:
    keep = _select(ids, names, classes)
    sel, new_targets = _subset(images, targets, keep)
    arr = images[sel] if len(keep) < len(ids) else images
    return RealData(name, split, [ids[k] for k in keep], [names[k] for k in keep], [None] * len(keep),
                    new_targets, resolution, channels,
                    _make=_ArrayMaker(arr, new_targets, resolution, channels), _source_key=key)


class _ArrayMaker:  # picklable factory (DataLoader workers)
    def __init__(self, arr, targets, resolution, channels):
        self.arr, self.targets, self.resolution, self.channels = arr, targets, resolution, channels

    def __call__(self, idx):
        return ArrayDataset(self.arr, self.targets, idx, self.resolution, self.channels)


class _FileMaker:
    def __init__(self, files, targets, resolution, channels):
        self.files, self.targets, self.resolution, self.channels = files, targets, resolution, channels

    def __call__(self, idx):
        return FileDataset(self.files, self.targets, idx, self.resolution, self.channels)


# --------------------------------------------------------------------------- image folders


def _scan(folder: Path, class_ids: list[str]) -> tuple[list[Path], np.ndarray]:
    files, targets = [], []
    for c, cid in enumerate(class_ids):
        d = folder / cid
        found = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not found:
            raise Mgd3Error(f"class folder {d} has no images")
        files += found
        targets += [c] * len(found)
    return files, np.asarray(targets, dtype=np.int64)


def _split_dir(root: Path, split: str) -> Path:
    if (root / "train").is_dir():
        if split == "train":
            return root / "train"
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / name
        raise Mgd3Error(f"{root} has train/ but no val/ or test/ folder for the test split")
    if split == "train":
        return root
    raise Mgd3Error(f"{root} has no train/ and val/ (or test/) sub-folders, so it has no test split")


def image_folder(path: str, split: str, resolution, channels, classes, class_map=None, **_) -> RealData:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise Mgd3Error(f"data folder {root} does not exist")
    folder = _split_dir(root, split)
    all_ids = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not all_ids:
        raise Mgd3Error(f"{folder} has no class sub-folders")
    names = [WNID_NAMES.get(i, i) for i in all_ids]
    keep = _select(all_ids, names, classes)
    ids = [all_ids[k] for k in keep]
    return _folder_data(str(path), split, folder, ids, [names[k] for k in keep], [None] * len(ids),
                        resolution or 256, channels or 3, class_map)


def _folder_data(name, split, folder, ids, names, labels, resolution, channels, class_map) -> RealData:
    files, targets = _scan(folder, ids)
    if class_map:
        mapping = read_class_map(class_map)
        labels = [mapping.get(i, labels[c]) for c, i in enumerate(ids)]
    return RealData(name, split, ids, names, labels, targets, resolution, channels,
                    _make=_FileMaker(files, targets, resolution, channels),
                    _source_key=_stat_key(files, folder))


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """JSON {class_id: label} or text lines 'class_id label' (# comments)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise Mgd3Error(f"class map {p} does not exist")
    text = p.read_text()
    if text.lstrip().startswith("{"):
        try:
            return {str(k): int(v) for k, v in json.loads(text).items()}
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise Mgd3Error(f"class map {p} is not a JSON object of class id -> integer label ({e})") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise Mgd3Error(f"class map {p}, line {n}: expected 'CLASS_ID LABEL', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def _imagenet_subset(name: str, wnids: list[str], labels: list[int] | None):
    def load(split, resolution, channels, classes, data_root=None, class_map=None, **_) -> RealData:
        root = data_root or os.environ.get("MGD3_IMAGENET_ROOT")
        if not root:
            raise Mgd3Error(f"{name} reads ImageNet-1K images: pass --data-root /path/to/imagenet "
                            "(with train/<wnid>/ and val/<wnid>/) or set MGD3_IMAGENET_ROOT")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise Mgd3Error(f"ImageNet root {root} does not exist")
        folder = _split_dir(root, split)
        names = [WNID_NAMES.get(w, w) for w in wnids]
        keep = _select(wnids, names, classes)
        ids = [wnids[k] for k in keep]
        missing = [w for w in ids if not (folder / w).is_dir()]
        if missing:
            raise Mgd3Error(f"{folder} lacks {len(missing)} {name} class folder(s): {', '.join(missing[:10])}"
                            + (" ..." if len(missing) > 10 else ""))
        labs = [labels[k] for k in keep] if labels else [None] * len(ids)
        return _folder_data(name, split, folder, ids, [names[k] for k in keep], labs, resolution or 256,
                            channels or 3, class_map)

    DATASETS.add(name, load)


_imagenet_subset("imagenette", IMAGENETTE, IMAGENETTE_LABELS)
_imagenet_subset("imagewoof", IMAGEWOOF, IMAGEWOOF_LABELS)
_imagenet_subset("imageidc", IMAGENET100[:10], None)
_imagenet_subset("imagenet100", IMAGENET100, None)


def load_data(name_or_path: str, split: str = "train", *, resolution: int | None = None,
              channels: int | None = None, classes: Sequence[str] | None = None,
              data_root: str | None = None, class_map: str | None = None) -> RealData:
    """Load a named dataset or an image folder (see module docstring)."""
    if split not in ("train", "test"):
        raise Mgd3Error(f"unknown split {split!r}; known: train, test")
    if channels not in (None, 1, 3):
        raise Mgd3Error(f"channels must be 1 or 3, got {channels}")
    name = str(name_or_path)
    if ":" in name and name.split(":", 1)[0] in DATASETS:
        name, data_root = name.split(":", 1)
    if name in DATASETS:
        data = DATASETS.get(name)(split, resolution, channels, classes, data_root=data_root, class_map=class_map)
    elif Path(name).expanduser().exists() or "/" in name or name.startswith("."):
        data = image_folder(name, split, resolution, channels, classes, class_map=class_map)
    else:
        raise Mgd3Error(f"unknown dataset {name!r}: not a folder and not one of {', '.join(DATASETS.names())}")
    if class_map and name in ("fashion-mnist", "digits"):
        mapping = read_class_map(class_map)
        data.labels = [mapping.get(i) for i in data.class_ids]
    return data
