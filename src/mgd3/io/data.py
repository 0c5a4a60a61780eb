"""Stage: real data. Images as float tensors in [-1, 1] at the model's resolution and channels,
with integer class indices, stable class ids (output folder names), readable names and, where
known, the model label of each class.

Sources (docs/METHODS.md §4): Fashion-MNIST (Debian `dataset-fashion-mnist` IDX files), scikit-learn
digits, any image folder with class sub-folders (torchvision ImageFolder convention), and the
ImageNet subsets of the dataset-distillation literature (ImageNette, ImageWoof, ImageIDC,
ImageNet-100) read from an ImageNet-1K root.

One transform for every source: channel conversion (gray -> RGB by repeating, RGB -> gray by
luminance as PIL "L"), shorter side resized to R (bicubic, antialiased), centre crop R x R,
then [0, 1] -> [-1, 1]. Items already R x R skip the resize.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mgd3.errors import Mgd3Error
from mgd3.registry import Registry

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
# torchvision's ImageFolder extensions
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_FOLDER_RESOLUTION = 256

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                       "Bag", "Ankle boot"]

# ImageNet subsets (docs/METHODS.md §4), in the literature's class order. DiT label = index of the wnid among
# the sorted 1000 ImageNet-1K wnids.
IMAGENETTE = ("n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 "
              "n03445777 n03888257").split()
IMAGENETTE_LABELS = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
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
IMAGEIDC = IMAGENET100[:10]

# ImageNet-1K class names (the synset lines, "tench, Tinca tinca") of the subset wnids, checked
# against the ILSVRC-2012 synset mapping (LOC_synset_mapping.txt / synset_words.txt).
WNID_NAMES = dict(line.split(" ", 1) for line in """\
n01440764 tench, Tinca tinca
n02102040 English springer, English springer spaniel
n02979186 cassette player
n03000684 chain saw, chainsaw
n03028079 church, church building
n03394916 French horn, horn
n03417042 garbage truck, dustcart
n03425413 gas pump, gasoline pump, petrol pump, island dispenser
n03445777 golf ball
n03888257 parachute, chute
n02096294 Australian terrier
n02093754 Border terrier
n02111889 Samoyed, Samoyede
n02088364 beagle
n02086240 Shih-Tzu
n02089973 English foxhound
n02087394 Rhodesian ridgeback
n02115641 dingo, warrigal, warragal, Canis dingo
n02099601 golden retriever
n02105641 Old English sheepdog, bobtail
n02869837 bonnet, poke bonnet
n01749939 green mamba
n02488291 langur
n02107142 Doberman, Doberman pinscher
n13037406 gyromitra
n02091831 Saluki, gazelle hound
n04517823 vacuum, vacuum cleaner
n04589890 window screen
n03062245 cocktail shaker
n01773797 garden spider, Aranea diademata
n01735189 garter snake, grass snake
n07831146 carbonara
n07753275 pineapple, ananas
n03085013 computer keyboard, keypad
n04485082 tripod
n02105505 komondor
n01983481 American lobster, Northern lobster, Maine lobster, Homarus americanus
n02788148 bannister, banister, balustrade, balusters, handrail
n03530642 honeycomb
n04435653 tile roof
n02086910 papillon
n02859443 boathouse
n13040303 stinkhorn, carrion fungus
n03594734 jean, blue jean, denim
n02085620 Chihuahua
n02099849 Chesapeake Bay retriever
n01558993 robin, American robin, Turdus migratorius
n04493381 tub, vat
n02109047 Great Dane
n04111531 rotisserie
n02877765 bottlecap
n04429376 throne
n02009229 little blue heron, Egretta caerulea
n01978455 rock crab, Cancer irroratus
n02106550 Rottweiler
n01820546 lorikeet
n01692333 Gila monster, Heloderma suspectum
n07714571 head cabbage
n02974003 car wheel
n02114855 coyote, prairie wolf, brush wolf, Canis latrans
n03785016 moped
n03764736 milk can
n03775546 mixing bowl
n02087046 toy terrier
n07836838 chocolate sauce, chocolate syrup
n04099969 rocking chair, rocker
n04592741 wing
n03891251 park bench
n02701002 ambulance
n03379051 football helmet
n02259212 leafhopper
n07715103 cauliflower
n03947888 pirate, pirate ship
n04026417 purse
n02326432 hare
n03637318 lampshade, lamp shade
n01980166 fiddler crab
n02113799 standard poodle
n03903868 pedestal, plinth, footstall
n02483362 gibbon, Hylobates lar
n04127249 safety pin
n03017168 chime, bell, gong
n02093428 American Staffordshire terrier, Staffordshire terrier, American pit bull terrier, pit bull terrier
n02804414 bassinet
n02396427 wild boar, boar, Sus scrofa
n04418357 theater curtain, theatre curtain
n02172182 dung beetle
n01729322 hognose snake, puff adder, sand viper
n02113978 Mexican hairless
n03787032 mortarboard
n02089867 Walker hound, Walker foxhound
n02119022 red fox, Vulpes vulpes
n03777754 modem
n04238763 slide rule, slipstick
n02231487 walking stick, walkingstick, stick insect
n03032252 cinema, movie theater, movie theatre, movie house, picture palace
n02138441 meerkat, mierkat
n02104029 kuvasz
n03837869 obelisk
n03494278 harmonica, mouth organ, harp, mouth harp
n04136333 sarong
n03794056 mousetrap
n03492542 hard disc, hard disk, fixed disk
n02018207 American coot, marsh hen, mud hen, water hen, Fulica americana
n04067472 reel
n03930630 pickup, pickup truck
n03584829 iron, smoothing iron
n02123045 tabby, tabby cat
n04229816 ski mask
n02100583 vizsla, Hungarian pointer
n03642806 laptop, laptop computer
n04336792 stretcher
n03259280 Dutch oven
n02116738 African hunting dog, hyena dog, Cape hunting dog, Lycaon pictus
n02108089 boxer
n03424325 gasmask, respirator, gas helmet
n01855672 goose
n02090622 borzoi, Russian wolfhound
""".splitlines())
_WNID = re.compile(r"n\d{8}")


# --------------------------------------------------------------------------- transforms


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
        return to_model_space(read_image(self.files[j], self.channels), self.resolution, self.channels), \
            int(self.targets[j])


def read_image(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """An image file as uint8 (channels, H, W); PIL does the channel conversion."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            arr = np.asarray(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        msg = " ".join(str(e).split())
        raise Mgd3Error(f"cannot read image {path}: {type(e).__name__}{': ' + msg if msg else ''}") from None
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- sources

# A source holds the items of a split (all classes that were selected) and builds datasets of
# them; both kinds are plain picklable objects (DataLoader workers).


class _ArraySource:
    def __init__(self, images: np.ndarray, rows: np.ndarray, scale: float, key: str):
        self.images, self.rows, self.scale, self.key = images, rows, scale, key
        self.native_size = images.shape[-1] if images.shape[-1] == images.shape[-2] else None
        self.native_channels = images.shape[1]

    def dataset(self, idx: np.ndarray, targets: np.ndarray, resolution: int, channels: int) -> Dataset:
        return ArrayDataset(self.images, self.rows[idx], targets[idx], self.scale, resolution, channels)


class _FileSource:
    def __init__(self, files: list[str], key: str):
        self.files, self.key = files, key
        self.native_size, self.native_channels = None, 3

    def dataset(self, idx: np.ndarray, targets: np.ndarray, resolution: int, channels: int) -> Dataset:
        return FileDataset([self.files[i] for i in idx], targets[idx], resolution, channels)


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
    _source: _ArraySource | _FileSource = field(repr=False, default=None)
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


def _select(all_ids: Sequence[str], all_names: Sequence[str], classes: Sequence[str] | None) -> list[int]:
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


def _keep(targets: np.ndarray, keep: list[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Items of the classes `keep` (in item order) and their new class indices 0..len(keep)-1."""
    remap = np.full(num_classes, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    new = remap[targets]
    rows = np.flatnonzero(new >= 0)
    return rows, new[rows]


# --------------------------------------------------------------------------- Fashion-MNIST

_IDX_CACHE: dict[tuple, np.ndarray] = {}


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """A (gzipped) IDX file of unsigned bytes as a read-only uint8 array; corrupt -> Mgd3Error."""
    path = Path(path)
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key in _IDX_CACHE:
        return _IDX_CACHE[cache_key]
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
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


@DATASETS.register("fashion-mnist")
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
    keep = _select(ids, FASHION_MNIST_NAMES, classes)
    rows, targets = _keep(labels.astype(np.int64), keep, len(ids))
    key = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in (img_f, lab_f)])
    source = _ArraySource(images[:, None], rows, 255.0, key)  # (N, 1, 28, 28) view, no copy
    return [ids[k] for k in keep], [FASHION_MNIST_NAMES[k] for k in keep], [None] * len(keep), targets, source


@DATASETS.register("digits")
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
    keep = _select(ids, ids, classes)
    rows, targets = _keep(d.target[items].astype(np.int64), keep, len(ids))
    key = hashlib.sha256(images.tobytes() + d.target.astype(np.int64).tobytes()).hexdigest()
    source = _ArraySource(images, items[rows], 16.0, key)
    return [ids[k] for k in keep], [ids[k] for k in keep], [None] * len(keep), targets, source


# --------------------------------------------------------------------------- image folders


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _walk_images(top: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the image files under `top`, recursively (symlinks
    followed, hidden entries skipped), sorted by path."""
    out, seen, stack = [], set(), [top]
    while stack:
        d = stack.pop()
        st = d.stat()
        if (st.st_dev, st.st_ino) in seen:  # symlink loop
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(Path(e.path))
                elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file():
                    s = e.stat()
                    out.append((os.path.relpath(e.path, top), s.st_size, s.st_mtime_ns))
                elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_symlink() and not os.path.exists(e.path):
                    out.append((os.path.relpath(e.path, top), -1, 0))  # a broken link: a missing file
    return sorted(out)


def _scan(folder: Path, class_ids: list[str]) -> tuple[list[str], np.ndarray, str]:
    """Files and class indices of the class folders `class_ids` of `folder`, and a key over
    their relative paths, sizes and mtimes."""
    files: list[str] = []
    targets: list[int] = []
    h = hashlib.sha256()
    for c, cid in enumerate(tqdm(class_ids, desc=f"scanning {folder}", unit="class",
                                 disable=True if len(class_ids) < 20 else None)):
        found = _walk_images(folder / cid)
        if not found:
            raise Mgd3Error(f"class folder {folder / cid} has no images ({', '.join(IMG_EXTENSIONS)})")
        for rel, size, mtime in found:
            files.append(str(folder / cid / rel))
            h.update(f"{cid}/{rel}|{size}|{mtime}\n".encode())
        targets += [c] * len(found)
    return files, np.asarray(targets, dtype=np.int64), h.hexdigest()


def _split_folder(root: Path, split: str) -> Path:
    """PATH/train and PATH/val (or PATH/test) when PATH/train exists, else PATH is the train split."""
    if (root / "train").is_dir():
        if split == "train":
            return root / "train"
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / name
        raise Mgd3Error(f"no test split: {root} has train/ but neither {root / 'val'} nor {root / 'test'}")
    if split == "train":
        return root
    raise Mgd3Error(f"no test split: looked for {root / 'train'} with {root / 'val'} or {root / 'test'}; "
                    f"{root} without train/ is a train split only")


def _check_class_folders(folder: Path, ids: list[str], what: str) -> None:
    missing = [i for i in ids if not (folder / i).is_dir()]
    if missing:
        hint = ""
        if any(e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(folder)):
            hint = " (its images must be sorted into one sub-folder per class)"
        raise Mgd3Error(f"{folder} lacks {len(missing)} {what} class folder(s){hint}: {', '.join(missing)}")


def image_folder(path: str, split: str, classes=None) -> tuple:
    """Classes = the sorted sub-folders of the train split (torchvision ImageFolder), so train
    and test share class indices."""
    root = Path(path).expanduser()
    if not root.exists():
        raise Mgd3Error(f"data folder {root} does not exist")
    if not root.is_dir():
        raise Mgd3Error(f"data path {root} is not a folder (expected class sub-folders of images)")
    train = _split_folder(root, "train")
    folder = _split_folder(root, split)
    all_ids = _class_dirs(train)
    if not all_ids:
        raise Mgd3Error(f"{train} has no class sub-folders")
    names = [WNID_NAMES.get(i, i) for i in all_ids]
    keep = _select(all_ids, names, classes)
    ids = [all_ids[k] for k in keep]
    if folder != train:
        _check_class_folders(folder, ids, "train")
        extra = sorted(set(_class_dirs(folder)) - set(all_ids))
        if extra:
            log.warning("%s has class folders that %s lacks; ignored: %s", folder, train, ", ".join(extra))
    files, targets, key = _scan(folder, ids)
    return ids, [names[k] for k in keep], [None] * len(ids), targets, _FileSource(files, key)


def _image_problem(path: str) -> str | None:
    """Why an image file cannot be used (missing, empty, not an image, a corrupt header or PNG
    chunk), or None. A cheap check, without decoding every pixel: a file whose pixel data is
    damaged can still stop the run when it is read for encoding."""
    from PIL import Image

    if not os.path.exists(path):
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def check_files(source: "_FileSource", targets: np.ndarray, class_ids: list[str], strict: bool) -> tuple:
    """Drop missing or unreadable image files (one warning with their count), or with `strict`
    stop at the first. The result is cached per file listing, so a second run checks nothing."""
    from mgd3.files import cache_root, write_text_atomic

    cache = cache_root() / "checked" / f"{hashlib.sha256(source.key.encode()).hexdigest()[:24]}.json"
    try:
        bad = {int(k): v for k, v in json.loads(cache.read_text()).items()}
    except (OSError, ValueError):
        bad = {}
        for i, f in enumerate(tqdm(source.files, desc="checking images", unit="img", leave=False,
                                   disable=True if len(source.files) < 5000 else None)):
            why = _image_problem(f)
            if why is not None:
                bad[i] = why
        try:
            write_text_atomic(cache, json.dumps(bad))
        except OSError:
            pass  # a read-only cache only costs the check next time
    if not bad:
        return source, targets
    first = min(bad)
    if strict:
        raise Mgd3Error(f"image {source.files[first]} is unusable ({bad[first]}); {len(bad)} such file(s) "
                        "in all (without --strict they are skipped)")
    keep = np.array([i not in bad for i in range(len(source.files))])
    log.warning("skipped %d missing or unreadable image file(s), e.g. %s (%s); --strict stops instead",
                len(bad), source.files[first], bad[first])
    files = [f for f, k in zip(source.files, keep) if k]
    dropped = hashlib.sha256(json.dumps(sorted(bad)).encode()).hexdigest()
    targets = targets[keep]
    empty = [cid for c, cid in enumerate(class_ids) if not (targets == c).any()]
    if empty:
        raise Mgd3Error(f"class {empty[0]!r} has no readable images left")
    return _FileSource(files, f"{source.key}|without:{dropped}"), targets


# --------------------------------------------------------------------------- ImageNet subsets


def _imagenet_labels(train: Path, wnids: list[str]) -> list[int | None]:
    """docs/METHODS.md §4: a wnid's label is its index among the sorted wnids of a full ImageNet-1K train
    folder; None where the folder is not one."""
    all_wnids = [d for d in _class_dirs(train) if _WNID.fullmatch(d)]
    if len(all_wnids) != 1000:
        return [None] * len(wnids)
    pos = {w: i for i, w in enumerate(all_wnids)}
    return [pos.get(w) for w in wnids]


def _imagenet_subset(name: str, wnids: list[str], labels: list[int] | None) -> None:
    def load(split: str, classes=None, data_root=None) -> tuple:
        root = data_root or os.environ.get("MGD3_IMAGENET_ROOT")
        how = ("pass --data-root /path/to/imagenet (an ImageNet-1K root with train/<wnid>/ and val/<wnid>/), "
               f"set MGD3_IMAGENET_ROOT, or use {name}:/path/to/imagenet")
        if not root:
            raise Mgd3Error(f"{name} reads ImageNet-1K images but no ImageNet root is set: {how}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise Mgd3Error(f"ImageNet root {root} does not exist ({name}): {how}")
        train = _split_folder(root, "train")
        folder = _split_folder(root, split)
        names = [WNID_NAMES.get(w, w) for w in wnids]
        keep = _select(wnids, names, classes)
        ids = [wnids[k] for k in keep]
        _check_class_folders(folder, ids, name)
        labs = [labels[k] for k in keep] if labels else _imagenet_labels(train, ids)
        files, targets, key = _scan(folder, ids)
        return ids, [names[k] for k in keep], labs, targets, _FileSource(files, key)

    load.__doc__ = f"{name}: {len(wnids)} ImageNet-1K classes read from an ImageNet root."
    DATASETS.add(name, load)


_imagenet_subset("imagenette", IMAGENETTE, IMAGENETTE_LABELS)
_imagenet_subset("imagewoof", IMAGEWOOF, IMAGEWOOF_LABELS)
_imagenet_subset("imageidc", IMAGEIDC, None)
_imagenet_subset("imagenet100", IMAGENET100, None)


# --------------------------------------------------------------------------- class maps


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """A JSON object {class_id: label} or text lines 'CLASS_ID LABEL' (blank lines and # comments
    allowed; the id may contain spaces, the label is the last field)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise Mgd3Error(f"class map {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Mgd3Error(f"cannot read class map {p}: {e}") from None

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
            obj = json.loads(text, object_pairs_hook=pairs)
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
            raise Mgd3Error(f"class map {p}, line {n}: expected 'CLASS_ID LABEL', got {line!r}")
        if parts[0] in out:
            raise Mgd3Error(f"class map {p}, line {n}: class {parts[0]!r} is given twice")
        out[parts[0]] = int(parts[1])
    return out


# --------------------------------------------------------------------------- entry point


def load_data(name_or_path: str, split: str = "train", *, resolution: int | None = None,
              channels: int | None = None, classes: Sequence[str] | None = None,
              data_root: str | None = None, class_map: str | None = None, bad_files: str = "lazy") -> RealData:
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
        raise Mgd3Error(f"unknown dataset {name!r} (and no such folder); known: {', '.join(DATASETS.names())}")
    if bad_files not in ("lazy", "skip", "strict"):
        raise ValueError(f"bad_files must be lazy, skip or strict, got {bad_files!r}")
    if isinstance(source, _FileSource) and bad_files != "lazy":
        source, targets = check_files(source, targets, ids, strict=bad_files == "strict")
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
