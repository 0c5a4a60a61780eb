"""Files on disk, the same way everywhere: the cache root, writes that never leave a half-written
file under the final name, and a cheap fingerprint of a folder of (possibly huge) files."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $MGD3_CACHE_DIR, else ~/.cache/mgd3."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MGD3_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgd3"


class WriteError(Mgd3Error, OSError):
    """A file mgd3 could not write, said in one line with what to do. Also an OSError, so code that
    can go on without the file (a cache) catches it like any write failure."""


_PSEUDO = ("/proc", "/sys", "/dev")
_ADVICE = {
    errno.ENOSPC: "the disk is full; free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free space or choose a folder on another disk",
    errno.EFBIG: "the file is larger than this file system or the process's file size limit (ulimit -f) "
                 "allows; raise the limit or choose a folder on another file system",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
}


def write_error(path: Path, e: BaseException) -> WriteError:
    """The one-line error for a failed write of `path` (`e`: the OSError, or torch's RuntimeError
    from its archive writer, which carries no errno: the free space is looked up instead)."""
    path = Path(path)
    code = getattr(e, "errno", None)
    if code is None:  # torch: "PytorchStreamWriter failed writing file ...": a full disk or a size limit
        try:
            st = os.statvfs(path.parent)
            code = errno.ENOSPC if st.f_bavail * st.f_frsize < (64 << 20) else errno.EFBIG
        except OSError:
            code = errno.EIO
    real = os.path.realpath(path)
    if any(real == p or real.startswith(p + os.sep) for p in _PSEUDO):
        advice = "it is on a pseudo file system (/proc, /sys, /dev); choose a folder on a disk"
    else:
        advice = _ADVICE.get(code) or (getattr(e, "strerror", None) or " ".join(str(e).split())[:120])
    err = WriteError(f"cannot write {path}: {advice}")
    err.errno = code
    return err


def write_atomic(path: Path, write) -> None:
    """Call `write(tmp)` on a temporary name next to `path`, then rename it to `path`: readers
    see the old file or the whole new one. The temporary name is hidden (".name.<pid>.tmp").
    A failed write (full disk, file size limit, read-only or pseudo file system, no permission)
    is a `WriteError` naming `path` and what to do; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except WriteError:
        _remove(tmp)
        raise
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e) from None
    except RuntimeError as e:  # torch.save's archive writer
        _remove(tmp)
        if "write" not in str(e).lower():
            raise
        raise write_error(path, e) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


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


_CACHE_WARNED: set[str] = set()


def write_cache(path: Path, write) -> bool:
    """`write_atomic` for a cache file: a run can go on without it, so a failure is one warning
    (once per cache folder and process) and False, never an error."""
    try:
        write_atomic(path, write)
        return True
    except OSError as e:  # WriteError included
        folder = str(Path(path).parent.parent)
        if folder not in _CACHE_WARNED:
            _CACHE_WARNED.add(folder)
            log.warning("%s; going on without caching there (set --cache-dir or MGD3_CACHE_DIR to a writable "
                        "folder)", e)
        return False


def cache_text(path: Path, text: str) -> bool:
    return write_cache(path, lambda tmp: tmp.write_text(text))


def cache_torch(obj, path: Path) -> bool:
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_cache(path, write)


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
