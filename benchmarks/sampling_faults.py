"""Benchmark: where plain sampling's extra time went — page faults vs denormal floats.

Samples 10 Fashion-MNIST images (class 0, the shipped model, CFG 4, `--steps` DDPM steps) with
`Context.sample` in a fresh process per variant, and reports the sampling call's wall time, CPU
user and system seconds, minor page faults and a digest of the latents:

- `none`: the process as it starts (glibc's adaptive malloc thresholds);
- `denormal`: `torch.set_flush_denormal(True)` first (the first suspect);
- `malloc`: fixed glibc mmap/trim thresholds first (`mgd3.allocator.keep_freed_memory`, the fix).

    nice -n 10 python benchmarks/sampling_faults.py [--steps 10]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import time


def child(mode: str, steps: int) -> None:
    import torch

    if mode == "denormal":
        torch.set_flush_denormal(True)
    if mode == "malloc":
        from mgd3.allocator import keep_freed_memory

        assert keep_freed_memory()
    from mgd3.backends import load_backend
    from mgd3.io.data import load_data
    from mgd3.run.driver import shipped_model
    from mgd3.methods import ClassInfo, Context, Item, SamplerConfig, item_seed

    b = load_backend(shipped_model("fashion-mnist"))
    d = load_data("fashion-mnist", "train", resolution=28, channels=1)
    cls = [ClassInfo(i, cid, d.class_names[i], i) for i, cid in enumerate(d.class_ids)]
    ctx = Context(b, d, cls, 10, 0, SamplerConfig(steps=steps), progress=False)
    items = [Item(cls[0], k, item_seed(0, cls[0].class_id, k)) for k in range(10)]
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    x = ctx.sample(items)
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(f"| {mode} | {w1 - w0:.2f} | {r1.ru_utime - r0.ru_utime:.2f} | {r1.ru_stime - r0.ru_stime:.2f} | "
          f"{r1.ru_minflt - r0.ru_minflt} | {hashlib.sha256(x.numpy().tobytes()).hexdigest()[:12]} | "
          f"{os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.steps)
    print("| variant | wall s | CPU user s | CPU system s | minor faults | latents sha256 | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("none", "denormal", "malloc"):
        subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps)], check=True)


if __name__ == "__main__":
    main()
