"""Benchmark: VAE encoding throughput of real images (the `prepare` stage of MGD³), before and after.

"before" is the encoding path as it was (`backend.encode` on contiguous batches under
`no_grad`); "after" is `mgd3.core.encode` now (channels-last on a CPU, inference mode); both run with
the fixed malloc thresholds of allocator.py, as distill does. Both go
through the same `encode_classes` (DataLoader, per-class batches, float16 latents, no cache), in
interleaved pairs, so load on a shared machine hits both alike; the ratio is the median of the
per-pair ratios. Also checks that both give the same latents (float16 values that differ are
counted) and reports the encoder's FLOPs per image (`FlopCounterMode`) against the measured
matmul peak (timed `torch.mm` in this process). Writes benchmarks/results/encode_speed.md.

    nice -n 10 python benchmarks/encode_speed.py [--per-class 100] [--pairs 3] [--batch-sizes 64 256]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mgd3.core.encode as enc
from mgd3.allocator import keep_freed_memory
from mgd3.backends import load_backend
from mgd3.io.data import load_data
from mgd3.run.driver import shipped_model
from mgd3.machine import cpu_name
from mgd3.run.profile import count_flops, matmul_peak


def _before(backend, images):
    return backend.encode(images)


def encode(backend, data, sub, batch_size, variant):
    fast = enc._encode_batch
    if variant == "before":
        enc._encode_batch = _before
    try:
        t = time.perf_counter()
        lat = enc.encode_classes(backend, data, list(sub), batch_size=batch_size, progress=False, indices=sub,
                                 use_cache=False)
        return time.perf_counter() - t, lat
    finally:
        enc._encode_batch = fast


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=100, help="real images per class (10 classes)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "encode_speed.md"))
    args = ap.parse_args()

    keep_freed_memory()  # as `mgd3 distill` runs (allocator.py), for both variants
    backend = load_backend(shipped_model("fashion-mnist"))
    data = load_data("fashion-mnist", "train", resolution=backend.resolution, channels=backend.image_channels)
    rng = np.random.default_rng(0)
    sub = {c: np.sort(rng.choice(data.indices(c), args.per_class, replace=False)) for c in range(10)}
    n = sum(map(len, sub.values()))
    x1 = data.dataset(sub[0][:1])[0][0][None]
    _, enc_flops = count_flops(backend.encode, x1)
    load_before = load_average()
    peak = matmul_peak(n=2048)

    results = {}  # (variant, batch size) -> [images/s]
    ratios = {}
    diff = {}
    for b in args.batch_sizes:
        encode(backend, data, {0: sub[0][:b]}, b, "before")  # warm-up of this batch shape
        encode(backend, data, {0: sub[0][:b]}, b, "after")
        for p in range(args.pairs):
            order = ("before", "after") if p % 2 == 0 else ("after", "before")
            got = {}
            for v in order:
                s, lat = encode(backend, data, sub, b, v)
                results.setdefault((v, b), []).append(n / s)
                got[v] = lat
            ratios.setdefault(b, []).append(results[("after", b)][-1] / results[("before", b)][-1])
            if p == 0:
                a = torch.cat([got["after"][c] for c in sub])
                r = torch.cat([got["before"][c] for c in sub])
                diff[b] = ((a != r).float().mean().item(), (a - r).abs().max().item())
        print(f"batch {b}: before {statistics.median(results[('before', b)]):.0f} images/s, after "
              f"{statistics.median(results[('after', b)]):.0f}, ratio {statistics.median(ratios[b]):.2f}", flush=True)
    peak_after = matmul_peak(n=2048)
    load_after = load_average()
    base = statistics.median(results[("before", 64)]) if ("before", 64) in results else None

    lines = [
        "# Encoding throughput (Fashion-MNIST through the shipped VAE), before and after",
        "",
        f"Command: `nice -n 10 python benchmarks/encode_speed.py {' '.join(sys.argv[1:])}`",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"load average (1, 5, 15 min) before {load_before}, after {load_after}.",
        f"Work: {n} images ({args.per_class} per class), encoder {enc_flops / 1e6:.1f} MFLOP per image "
        f"(`FlopCounterMode`); fp32 matmul peak {peak / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after "
        "(timed 2048² `torch.mm`).",
        "",
        "| encode batch | variant | images/s (median) | runs | GFLOP/s | fraction of peak | "
        "after / before (median of pairs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in args.batch_sizes:
        for v in ("before", "after"):
            ips = statistics.median(results[(v, b)])
            lines.append(f"| {b} | {v} | {ips:.0f} | {', '.join(f'{x:.0f}' for x in results[(v, b)])} | "
                         f"{ips * enc_flops / 1e9:.1f} | {ips * enc_flops / peak:.0%} | "
                         f"{statistics.median(ratios[b]):.2f} |" if v == "after" else
                         f"| {b} | {v} | {ips:.0f} | {', '.join(f'{x:.0f}' for x in results[(v, b)])} | "
                         f"{ips * enc_flops / 1e9:.1f} | {ips * enc_flops / peak:.0%} | |")
    if base:
        lines += ["", "Against the old default (before, batch 64): " + ", ".join(
            f"after at batch {b}: {statistics.median(results[('after', b)]) / base:.2f}x" for b in args.batch_sizes)
            + "."]
    lines += ["", "Same latents: " + "; ".join(
        f"batch {b}: {f:.2%} of the float16 values differ, by at most {m:.2g}" for b, (f, m) in diff.items())
        + " (a difference is float32 rounding of another convolution order, seen through float16)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
