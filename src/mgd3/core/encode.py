"""Stage: VAE encoding of real images (z = mean of the posterior × scaling factor).

Encodings stream from disk in batches through one DataLoader (`workers` decoding processes;
per-class batches, so an image's latent does not depend on the other classes) and are cached
per (VAE, dataset, class) under the cache directory as float16 — 4×32×32×2 = 8 KiB per image
for DiT-XL/2 — so a second run with the same model and data skips the VAE entirely. Latents are
always the float16 values widened to float32, whether just encoded or read back, so a first and
a cached run find the same modes. `lazy=True` (what methods get through `Context.real_latents`)
keeps no class in memory: each encoded class is written and dropped, and the returned mapping
reads one class at a time back from the cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.files import cache_root, cache_torch

log = logging.getLogger(__name__)

# On-disk cache: <root>/latents/<VAE fingerprint>-<data fingerprint>-f16/<class id>[-<subset>].pt,
# float16 tensors. The float32 caches of earlier versions had no "-f16" suffix and are never read.
CACHE_VERSION = "f16"
CACHE_DTYPE = torch.float16


def _digest(idx) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:12]


def default_workers(device: torch.device | str) -> int:
    """DataLoader workers when none are asked for: 0 on a CPU (the VAE is the bottleneck and the
    cores are busy with it); on an accelerator, JPEG decoding is the bottleneck (docs/SCALE.md), so
    every CPU of this process's share but one, up to 16 (torchrun's LOCAL_WORLD_SIZE processes of a
    node share its CPUs)."""
    if torch.device(device).type == "cpu":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(16, per_process - 1))


def _load(path: Path) -> Tensor:
    return torch.load(path, map_location="cpu", weights_only=True).float()


def _cache_problem(path: Path, rows: int, shape: Sequence[int]) -> str | None:
    """Why a cache file cannot be used (unreadable, truncated, not a float16 tensor of `rows`
    latents of `shape`, non-finite values), or None."""
    try:
        lat = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle that is not plain tensors, garbage, I/O errors
        return " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if not isinstance(lat, Tensor) or lat.dtype != CACHE_DTYPE:
        return f"not a {CACHE_DTYPE} tensor ({type(lat).__name__}{f' {lat.dtype}' if isinstance(lat, Tensor) else ''})"
    if tuple(lat.shape) != (rows, *shape):
        return f"shape {tuple(lat.shape)}, expected {(rows, *shape)}"
    if safeio.view_problem(lat):
        return safeio.view_problem(lat)
    if not torch.isfinite(lat).all():
        return "non-finite values"
    return None


def _encode_batch(backend, images: Tensor) -> Tensor:
    """The backend's encoding of one batch, under inference mode; on a CPU the images go in
    channels-last (oneDNN's fast layout for these convolutions; the latents agree with the
    contiguous layout's to float rounding, see benchmarks/results/encode_speed.md)."""
    if torch.device(backend.device).type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return backend.encode(images).contiguous()  # (B, C, h, w)


class CachedLatents(Mapping):
    """{class index: (N_c, C, h, w) float32} read from the float16 cache files on access; only the
    class read last stays in memory."""

    def __init__(self, files: dict[int, Path | Tensor]):
        self.files = dict(files)
        self._last: tuple[int, Tensor] | None = None

    def __getitem__(self, c: int) -> Tensor:
        if self._last is None or self._last[0] != c:
            self._last = None  # drop the previous class before reading the next
            f = self.files[c]
            self._last = (c, f.float() if isinstance(f, Tensor) else _load(f))
        return self._last[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


class _PerClassBatches(torch.utils.data.Sampler):
    """Batches of positions into the concatenated items of the classes, never across a class."""

    def __init__(self, sizes: Sequence[int], batch_size: int):
        self.batches = []
        start = 0
        for n in sizes:
            end = start + n
            self.batches += [list(range(s, min(s + batch_size, end))) for s in range(start, end, batch_size)]
            start += n

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_error(e: Mgd3Error) -> Mgd3Error:
    """A DataLoader worker's Mgd3Error comes back with the worker's traceback in its message: keep
    the one line of the original message."""
    msg = str(e)
    if "Original Traceback" not in msg:
        return e
    last = msg.strip().splitlines()[-1]
    return Mgd3Error(last.split("Mgd3Error: ", 1)[-1])


def _items(data, indices: dict[int, np.ndarray] | None, c: int) -> np.ndarray:
    """The items of class c that are encoded: all of them, or the fixed subset `indices[c]`."""
    return data.indices(c) if indices is None or c not in indices else indices[c]


def _cache_folder(backend, data, cache_dir: str | os.PathLike | None) -> Path:
    """<cache>/latents/<VAE fingerprint>-<data fingerprint>-f16[-<precision>]."""
    # encodings under bf16/fp16 autocast differ from fp32 ones: their own folder (fp32 keeps the plain name)
    amp = "" if backend.precision == "fp32" else f"-{backend.precision}"
    name = f"{backend.vae_fingerprint()}-{data.fingerprint()}-{CACHE_VERSION}{amp}"
    return cache_root(cache_dir) / "latents" / name


def _cache_file(folder: Path, data, indices: dict[int, np.ndarray] | None, c: int) -> Path:
    """The cache file of class c: named by its class id, and by a digest of its subset if it has one."""
    sub = "" if indices is None or c not in indices else f"-{_digest(indices[c])}"
    return folder / f"{data.class_ids[c]}{sub}.pt"


def _from_cache(backend, data, class_indices: Sequence[int], folder: Path, indices: dict[int, np.ndarray] | None,
                use_cache: bool, lazy: bool) -> tuple[dict[int, Tensor], list[int]]:
    """({class index: float32 latents} read from usable cache files, none read when `lazy`; the
    classes still to encode). An unusable cache file is one warning, and its class is encoded again."""
    out: dict[int, Tensor] = {}
    todo = []
    for c in class_indices:
        f = _cache_file(folder, data, indices, c)
        if use_cache and f.is_file():
            why = _cache_problem(f, len(_items(data, indices, c)), backend.latent_shape)
            if why is None:
                if not lazy:
                    out[c] = _load(f)
                continue
            log.warning("encoding cache file %s is unusable (%s); encoding class %s again", f, why,
                        data.class_ids[c])
        todo.append(c)
    return out, todo


def _encode_todo(backend, data, todo: list[int], folder: Path, indices: dict[int, np.ndarray] | None, *,
                 batch_size: int, workers: int, use_cache: bool, progress: bool,
                 lazy: bool) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Encode the classes `todo` through one DataLoader in per-class batches, writing each class to
    the cache (`use_cache`) as it completes. Returns ({class index: float32 latents}, empty when
    `lazy`; {class index: float16 latents} of the classes whose cache file could not be written,
    when `lazy`)."""
    out: dict[int, Tensor] = {}
    kept: dict[int, Tensor] = {}
    sizes = [len(_items(data, indices, c)) for c in todo]
    dataset = data.dataset(np.concatenate([np.asarray(_items(data, indices, c), dtype=np.int64) for c in todo]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_PerClassBatches(sizes, batch_size), num_workers=workers,
        pin_memory=torch.device(backend.device).type == "cuda")
    bar = tqdm(total=sum(sizes), desc="encode", unit="img", disable=not progress, leave=False)
    batches = iter(loader)
    try:
        for c, n in zip(todo, sizes):
            parts, got = [], 0
            while got < n:
                images, _ = next(batches)
                z = _encode_batch(backend, images).to("cpu", CACHE_DTYPE)  # (B, C, h, w)
                if not bool(torch.isfinite(z).all()):  # before k-means or any library sees it
                    raise Mgd3Error(f"the VAE of {getattr(backend, 'path', 'the model')} encodes images of class "
                                    f"{data.class_ids[c]!r} to NaN, inf or latents beyond float16's range; the "
                                    "VAE (or its weights) is broken")
                parts.append(z)
                got += len(images)
                bar.update(len(images))
            lat = torch.cat(parts)
            del parts
            if use_cache and not cache_torch(lat, _cache_file(folder, data, indices, c)) and lazy:
                kept[c] = lat  # the cache could not be written: this class stays in memory (float16)
            if not lazy:
                out[c] = lat.float()
            del lat
    except Mgd3Error as e:
        raise _worker_error(e) from None
    finally:
        bar.close()
        del batches  # shuts the workers down
    return out, kept


def encode_classes(
    backend,
    data,
    class_indices: Sequence[int],
    *,
    batch_size: int = 64,
    workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    indices: dict[int, np.ndarray] | None = None,
    lazy: bool = False,
) -> Mapping[int, Tensor]:
    """Latents of the real images of the given classes: {class index: (N_c, C, h, w) float32},
    float16 precision. `indices` restricts a class to some of its items (a fixed subset; cached
    under its own name). `workers`: DataLoader processes that read and decode images. `lazy`
    (needs the cache): return a `CachedLatents` that holds at most one class in memory."""
    if workers < 0:
        raise Mgd3Error(f"--encode-workers must be at least 0, got {workers}")
    lazy = lazy and use_cache
    folder = _cache_folder(backend, data, cache_dir)
    out, todo = _from_cache(backend, data, class_indices, folder, indices, use_cache, lazy)
    if len(todo) < len(class_indices):
        log.info("encodings of %d classes from cache %s", len(class_indices) - len(todo), folder)
    kept: dict[int, Tensor] = {}
    if todo:
        encoded, kept = _encode_todo(backend, data, todo, folder, indices, batch_size=batch_size, workers=workers,
                                     use_cache=use_cache, progress=progress, lazy=lazy)
        out.update(encoded)
    if lazy:
        return CachedLatents({c: kept.get(c, _cache_file(folder, data, indices, c)) for c in class_indices})
    return {c: out[c] for c in class_indices}


def real_subset(data, c: int, max_per_class: int | None) -> np.ndarray:
    """The real items of class c that modes are found from: all of them, or a fixed random subset
    of `max_per_class` (seeded by the class id alone, so every method and the report agree)."""
    import hashlib

    idx = data.indices(c)
    if max_per_class is None or len(idx) <= max_per_class:
        return idx
    s = int(hashlib.sha256(f"real-subset/{data.class_ids[c]}".encode()).hexdigest()[:15], 16)
    return np.sort(np.random.default_rng(s).choice(idx, size=max_per_class, replace=False))


def real_latents(backend, data, class_indices: Sequence[int], *, max_per_class: int | None = None,
                 batch_size: int = 64, workers: int | None = None, cache_dir: str | os.PathLike | None = None,
                 use_cache: bool = True, progress: bool = True) -> Mapping[int, Tensor]:
    """{class index: (N_c, C, h, w) float32} latents of the real train images of the classes, in
    the order of `real_subset`: what methods cluster and what the report measures against. Encoded
    once and cached; the mapping holds one class in memory at a time (with `use_cache` False:
    encoded again, nothing written, every class in memory). `workers`: None picks
    `default_workers` for the backend's device."""
    subset = None
    if max_per_class is not None:
        subset = {c: real_subset(data, c, max_per_class) for c in class_indices}
    return encode_classes(backend, data, list(class_indices), batch_size=batch_size,
                          workers=default_workers(backend.device) if workers is None else workers,
                          cache_dir=cache_dir, use_cache=use_cache, progress=progress, indices=subset, lazy=True)
