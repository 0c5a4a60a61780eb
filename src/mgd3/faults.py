"""The last line of defence of the CLI: a fault no stage turned into an `Mgd3Error` (a file that
could not be written, an allocation that failed) said in one line that names the file or the
place and what to do, instead of a traceback or advice that does not fit.

torch reports a failed allocation as a `RuntimeError` ("DefaultCPUAllocator: can't allocate
memory: you tried to allocate N bytes", "CUDA out of memory. Tried to allocate N GiB"), not as a
`MemoryError`; both are mapped here. The advice names the stage where it happened: only in the
stages whose memory grows with --batch-size is a smaller batch the answer.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

_ALLOC = re.compile(r"can't allocate memory|out of memory|not enough memory|failed to allocate|"
                    r"allocation.*failed|DefaultCPUAllocator", re.IGNORECASE)
# where a batch is in memory: the sampler, guidance, modes and encoding, the methods, the
# evaluation's training loop, and pretraining and fine-tuning (paths as `_where` gives them)
_BATCH_STAGES = ("mgd3/core/", "mgd3/methods/", "mgd3/evaluation/train.py", "mgd3/train/")


def is_allocation_error(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and bool(_ALLOC.search(str(e))))


def _where(e: BaseException) -> str | None:
    """`path:function` of the innermost mgd3 frame of the traceback."""
    last = None
    for fs in traceback.extract_tb(e.__traceback__):
        if "/mgd3/" in fs.filename.replace("\\", "/"):
            last = fs
    if last is None:
        return None
    f = last.filename.replace("\\", "/")
    return f"{f[f.rindex('/mgd3/') + 1:]}:{last.lineno} ({last.name})"


def _size(text: str) -> str | None:
    m = re.search(r"allocate ([\d.]+ ?[KMGT]i?B)", text, re.IGNORECASE)
    if m:
        return m.group(1)
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        n = int(m.group(1))
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    return None


def allocation_line(e: BaseException) -> str:
    where = _where(e)
    size = _size(str(e))
    what = "out of memory" + (f" allocating {size}" if size else "") + (f" in {where}" if where else "")
    if where and where.startswith(_BATCH_STAGES):
        return f"{what}; try a smaller --batch-size (or --encode-batch-size) or resolution"
    return (f"{what}; an input (a file or an option's size) asks for more memory than this machine has: "
            "check the sizes the files and options above it name")


def os_error_line(e: OSError) -> str:
    import errno

    from mgd3.files import write_error

    if e.filename and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return str(write_error(Path(e.filename), e))
    reason = e.strerror or " ".join(str(e).split())[:160] or type(e).__name__
    if e.errno in (errno.EACCES, errno.EPERM):
        reason += " (check the permissions of that file or folder)"
    return f"{e.filename}: {reason}" if e.filename else reason


def describe(e: BaseException) -> str | None:
    """One line for a fault the CLI can say without a traceback, or None (a real bug)."""
    if is_allocation_error(e):
        return allocation_line(e)
    if isinstance(e, OSError):
        return os_error_line(e)
    return None
