"""Stage: the distilled set on disk.

    OUT/images/<class_id>/<index>.png   (torchvision ImageFolder-readable)
    OUT/latents.pt                      {"latents": (N, C, h, w), "paths": [...], ...}
    OUT/grid.png                        a few images per class, one row per class
    OUT/manifest.json                   written last: its presence means the set is complete

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written image or a manifest that claims a complete set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mgd3.errors import Mgd3Error

FORMAT = "mgd3-distilled-set/1"
OUTPUTS = ("images", "latents.pt", "grid.png", "manifest.json")


def prepare_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create (or, with overwrite, clear mgd3's outputs in) the output folder."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise Mgd3Error(f"output folder {out} is not empty (use --overwrite to replace it)")
        # the manifest goes first so a crash mid-clean never leaves a set that looks complete
        for name in ("manifest.json",) + OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        probe = out / ".mgd3-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise Mgd3Error(f"cannot write to output folder {out} ({e.strerror or e})") from None
    return out


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, R, R) in [-1, 1] -> (B, R, R) or (B, R, R, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()  # (B, R, R, C)
    return x[..., 0] if x.shape[-1] == 1 else x


def _replace_atomic(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    _replace_atomic(tmp, path)


def write_images(out: Path, class_ids: list[str], indices: list[int], images: Tensor) -> list[str]:
    """Write images (B, C, R, R) in [-1, 1]; returns their paths relative to `out`."""
    paths = []
    for cid, k, arr in zip(class_ids, indices, to_uint8(images)):
        rel = f"images/{cid}/{k}.png"
        save_png(arr, out / rel)
        paths.append(rel)
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


def save_torch(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    _replace_atomic(tmp, path)


def write_manifest(out: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, **manifest}
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    _replace_atomic(tmp, out / "manifest.json")


def read_manifest(out: str | os.PathLike) -> dict:
    f = Path(out) / "manifest.json"
    if not f.is_file():
        raise Mgd3Error(f"{out} is not a complete distilled set (no manifest.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise Mgd3Error(f"{f} is not valid JSON ({e.msg})") from None
