"""Real data read from image files: any image folder with class sub-folders (torchvision
ImageFolder convention) and the ImageNet subsets read from an ImageNet-1K root (the same
layout, class folders named by wnid; docs/METHODS.md §4). Scanning follows symlinks only where
that cannot change the class indices or walk the disk; `check_files` drops (or stops at)
unreadable files. Each loader returns the selected classes' ids, names, labels, targets and a
`FileSource` (`mgd3.io.data.DATASETS` registers them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.io.imagenet_classes import WNID, WNID_NAMES
from mgd3.io.sources import FileSource, select_classes

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_PSEUDO_FS = ("/proc", "/sys", "/dev", "/run")


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _entry_is_dir(e: os.DirEntry) -> bool | None:
    """`DirEntry.is_dir()` (symlinks followed); None for a link that cannot be followed (a loop)."""
    try:
        return e.is_dir()
    except OSError:
        return None


def _list(folder: Path, what: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if not e.name.startswith(".")]
    except OSError as e:  # EACCES, ELOOP, ENOTDIR, EIO ...
        raise Mgd3Error(f"cannot list {what} {folder} ({_reason(e)}); make it readable or move it out of "
                        "the data folder") from None


def _class_dirs(folder: Path) -> list[str]:
    """The class sub-folders (symlinks followed). A link that loops, or that leads to a folder
    holding the data folder (`/`, a parent) or into /proc, /sys, /dev, is an error: whether it
    is a class would change every class index after it."""
    out = []
    for e in _list(folder, "data folder"):
        is_dir = _entry_is_dir(e)
        if is_dir is None:
            raise Mgd3Error(f"{e.path} is a symbolic link that cannot be followed (a loop); remove it or make it "
                            "point to a class folder")
        if is_dir and e.is_symlink():
            why = _outside_walk(e.path, os.path.realpath(folder))
            if why:
                raise Mgd3Error(f"class folder {e.path} is a symbolic link that mgd3 does not follow: {why}")
        if is_dir:
            out.append(e.name)
    return sorted(out)


def _outside_walk(link: str, top_real: str) -> str | None:
    """Why a symlinked sub-folder of a class folder is not followed: it holds the class folder
    itself (a link to `/` or to a parent: the walk would never end or cover the disk), or it lies
    on a pseudo file system (/proc, /sys, /dev)."""
    target = os.path.realpath(link)
    if os.path.commonpath([target, top_real]) == target:
        return f"it points to {target}, a folder that contains the class folder"
    if any(target == p or target.startswith(p + os.sep) for p in _PSEUDO_FS):
        return f"it points into {target}, a pseudo file system"
    return None


def _walk_images(top: Path) -> list[tuple[str, int, int | str]]:
    """(relative path, size, "mtime_ns:ctime_ns:inode") of the image files under `top`, recursively (symlinks
    followed, hidden entries skipped), sorted by path. A sub-folder link that loops or leads to
    a folder holding `top` (or into /proc, /sys, /dev) is skipped with a warning; a folder that
    cannot be listed is a one-line error."""
    out, seen, stack = [], set(), [top]
    try:
        top_real = os.path.realpath(top)
    except OSError as e:
        raise Mgd3Error(f"cannot read class folder {top} ({_reason(e)})") from None
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError as e:
            raise Mgd3Error(f"cannot read folder {d} ({_reason(e)})") from None
        if (st.st_dev, st.st_ino) in seen:  # symlink loop
            continue
        seen.add((st.st_dev, st.st_ino))
        for e in _list(d, "class folder" if d == top else "folder"):
            is_dir = _entry_is_dir(e)
            if is_dir is None:
                if e.name.lower().endswith(IMG_EXTENSIONS):
                    out.append((os.path.relpath(e.path, top), -1, 0))  # a link that loops: a missing file
                else:
                    log.warning("%s is a symbolic link that cannot be followed (a loop); ignored", e.path)
            elif is_dir:
                why = _outside_walk(e.path, top_real) if e.is_symlink() else None
                if why:
                    log.warning("not following %s: %s", e.path, why)
                else:
                    stack.append(Path(e.path))
            elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file():
                s = e.stat()
                # ctime and inode too: a tar extraction restores names, sizes and mtimes, but any write
                # to a file sets its ctime, so two folders of other pixels never share cached encodings
                out.append((os.path.relpath(e.path, top), s.st_size, f"{s.st_mtime_ns}:{s.st_ctime_ns}:{s.st_ino}"))
            elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_symlink() and not os.path.exists(e.path):
                out.append((os.path.relpath(e.path, top), -1, 0))  # a broken link: a missing file
    return sorted(out)


def _scan(folder: Path, class_ids: list[str]) -> tuple[list[str], np.ndarray, str]:
    """Files and class indices of the class folders `class_ids` of `folder`, and a key over
    their relative paths, sizes, mtimes, ctimes and inodes (see `_walk_images`)."""
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
        if any(e.name.lower().endswith(IMG_EXTENSIONS) for e in _list(folder, "data folder")):
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
    keep = select_classes(all_ids, names, classes)
    ids = [all_ids[k] for k in keep]
    if folder != train:
        _check_class_folders(folder, ids, "train")
        extra = sorted(set(_class_dirs(folder)) - set(all_ids))
        if extra:
            log.warning("%s has class folders that %s lacks; ignored: %s", folder, train, ", ".join(extra))
    files, targets, key = _scan(folder, ids)
    return ids, [names[k] for k in keep], [None] * len(ids), targets, FileSource(files, key)


CHECK_VERSION = "decoded-1"  # what the cached check did: a full decode (an older verify-only result is not reused)


def _image_problem(path: str, resolution: int | None = None) -> str | None:
    """Why an image file cannot be used (missing, empty, not an image, over the pixel budget or
    what resizing it to `resolution` allocates, damaged pixel data), or None
    (`mgd3.images.image_problem`: decodes it once)."""
    from mgd3.images import image_problem

    return image_problem(path, resolution)


def check_files(source: "FileSource", targets: np.ndarray, class_ids: list[str], strict: bool,
                cache_dir: str | None = None, resolution: int | None = None) -> tuple:
    """Drop missing or unreadable image files (one warning with their count), or with `strict`
    stop at the first. The result is cached per file listing (under `cache_dir`, see
    `mgd3.files.cache_root`), so a second run checks nothing."""
    from mgd3.files import cache_root, cache_text

    key = f"{CHECK_VERSION}|{resolution}|{source.key}"
    cache = cache_root(cache_dir) / "checked" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    try:
        bad = {int(k): str(v) for k, v in safeio.read_json_object(cache, 64 << 20).items()}
    except (Mgd3Error, ValueError):
        bad = {}
        for i, f in enumerate(tqdm(source.files, desc="checking images", unit="img", leave=False,
                                   disable=True if len(source.files) < 5000 else None)):
            why = _image_problem(f, resolution)
            if why is not None:
                bad[i] = why
        cache_text(cache, json.dumps(bad))  # a failed write warns once and only costs the check next time
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
    return FileSource(files, f"{source.key}|without:{dropped}"), targets


# --------------------------------------------------------------------------- ImageNet subsets


def _imagenet_labels(train: Path, wnids: list[str]) -> list[int | None]:
    """docs/METHODS.md §4: a wnid's label is its index among the sorted wnids of a full ImageNet-1K train
    folder; None where the folder is not one."""
    all_wnids = [d for d in _class_dirs(train) if WNID.fullmatch(d)]
    if len(all_wnids) != 1000:
        return [None] * len(wnids)
    pos = {w: i for i, w in enumerate(all_wnids)}
    return [pos.get(w) for w in wnids]


def imagenet_subset(name: str, wnids: list[str], labels: list[int] | None) -> Callable[..., tuple]:
    """The loader of an ImageNet subset: the classes `wnids` (DiT `labels`, else derived from a full
    ImageNet-1K root) read from the root given as `data_root`, else MGD3_IMAGENET_ROOT."""

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
        keep = select_classes(wnids, names, classes)
        ids = [wnids[k] for k in keep]
        _check_class_folders(folder, ids, name)
        labs = [labels[k] for k in keep] if labels else _imagenet_labels(train, ids)
        files, targets, key = _scan(folder, ids)
        return ids, [names[k] for k in keep], labs, targets, FileSource(files, key)

    load.__doc__ = f"{name}: {len(wnids)} ImageNet-1K classes read from an ImageNet root."
    return load
