"""What machine a measurement ran on, for eval records, model cards and benchmark results."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """CPU cores this process may run on."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class cpu_threads:  # noqa: N801  (a context manager, named as the action it scopes)
    """`with cpu_threads(n):` torch and the BLAS/OpenMP pools of numpy and scikit-learn use `n`
    threads inside, what they used before after; `n` None changes nothing."""

    def __init__(self, n: int | None):
        self.n = n
        self._before = None
        self._limits = None

    def __enter__(self):
        if self.n is None:
            return self
        import torch
        from threadpoolctl import threadpool_limits

        self._before = torch.get_num_threads()
        torch.set_num_threads(int(self.n))
        self._limits = threadpool_limits(int(self.n))
        return self

    def __exit__(self, *exc):
        if self.n is None:
            return False
        import torch

        self._limits.restore_original_limits()
        torch.set_num_threads(self._before)
        return False
