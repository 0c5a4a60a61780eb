"""Files on disk, the same way everywhere: the cache root, writes that never leave a half-written
file under the final name, and a cheap fingerprint of a folder of (possibly huge) files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mgd3.errors import Mgd3Error


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $MGD3_CACHE_DIR, else ~/.cache/mgd3."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MGD3_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgd3"


def write_atomic(path: Path, write) -> None:
    """Call `write(tmp)` on a temporary name next to `path`, then rename it to `path`: readers
    see the old file or the whole new one. The temporary name is hidden (".name.<pid>.tmp")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_torch_atomic(obj, path: Path) -> None:
    """torch.save through an open file: saving to a path would name the archive's records after
    the temporary file (with its pid), so the same tensors would give different bytes each run."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, write)


def folder_fingerprint(folder: Path) -> str:
    """Changes when a file of the folder (recursively; hidden files and *.md aside) changes its
    name, size, first or last MiB: cheap even for GB weight files."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted((f for f in folder.rglob("*") if f.is_file() and f.suffix != ".md"
                    and not any(part.startswith(".") for part in f.relative_to(folder).parts)),
                   key=lambda f: f.relative_to(folder).as_posix())
    for f in files:
        size = f.stat().st_size
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def to_uint8(images):
    """Images in [-1, 1] (any float tensor shape) -> uint8 0..255, the same shape: how a pixel is
    written to a file (exact for images that came from 8-bit pixels)."""
    import torch

    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def read_json_object(f: Path, what: str | None = None, max_bytes: int = 64 << 20) -> dict:
    """A JSON file that must hold an object (a config, a manifest): one-line errors for a file
    that is missing, not a regular file, unreadable, too large, not UTF-8, not JSON, nested too
    deeply, with an absurdly long integer or another JSON value (`mgd3.safeio`)."""
    from mgd3 import safeio

    return safeio.read_json_object(f, max_bytes, str(f), f"{what or 'config'} file")
