"""Stage: VAE encoding of real images (z = mean of the posterior × scaling factor).

Encodings stream in batches and are cached per (VAE, dataset, class) under the cache
directory, so a second run with the same model and data skips the VAE entirely.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _digest(idx) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:12]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $MGD3_CACHE_DIR, else ~/.cache/mgd3."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MGD3_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgd3"


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def encode_classes(
    backend,
    data,
    class_indices: Sequence[int],
    *,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    indices: dict[int, np.ndarray] | None = None,
) -> dict[int, Tensor]:
    """Latents of the real images of the given classes: {class index: (N_c, C, h, w) float32}.
    `indices` restricts a class to some of its items (a fixed subset; cached under its own name)."""

    def items(c):
        return data.indices(c) if indices is None or c not in indices else indices[c]

    def cache_file(c):
        sub = "" if indices is None or c not in indices else f"-{_digest(indices[c])}"
        return folder / f"{data.class_ids[c]}{sub}.pt"

    folder = cache_root(cache_dir) / "latents" / f"{backend.vae_fingerprint()}-{data.fingerprint()}"
    out: dict[int, Tensor] = {}
    todo = []
    for c in class_indices:
        f = cache_file(c)
        if use_cache and f.is_file():
            out[c] = torch.load(f, map_location="cpu", weights_only=True)
        else:
            todo.append(c)
    if len(todo) < len(class_indices):
        log.info("encodings of %d classes from cache %s", len(class_indices) - len(todo), folder)
    if not todo:
        return out
    total = sum(len(items(c)) for c in todo)
    bar = tqdm(total=total, desc="encode", unit="img", disable=not progress, leave=False)
    for c in todo:
        loader = torch.utils.data.DataLoader(
            data.dataset(items(c)), batch_size=batch_size, shuffle=False, num_workers=0
        )
        parts = []
        for images, _ in loader:
            parts.append(backend.encode(images).cpu())  # (B, C, h, w)
            bar.update(len(images))
        out[c] = torch.cat(parts)
        if use_cache:
            save_atomic(out[c], cache_file(c))
    bar.close()
    return out
