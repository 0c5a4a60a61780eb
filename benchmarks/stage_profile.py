"""Benchmark: every stage of `mgd3 distill` against the machine's limit.

Runs the README job in this process (`--data fashion-mnist --ipc 10 --max-real-per-class 1000`,
the shipped model, MGD³; a fresh encoding cache, so the time includes encoding) and reports its
stage profile (`mgd3.run.profile`: images, forwards, FLOPs, seconds) next to the measured fp32 matmul
peak of the same process (a timed 2048³ `torch.mm`, best of 5, before and after the run), so each
stage's rate is a fraction of the limit, not an absolute time. Records the load average next to
the numbers: on a shared machine, re-run it when the machine is quiet. Writes
benchmarks/results/stage_profile.md (or --out).

    nice -n 10 python benchmarks/stage_profile.py                         # the README job
    nice -n 10 python benchmarks/stage_profile.py --max-real-per-class 0  # official: every real image
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mgd3.run.driver import DistillConfig, distill
from mgd3.machine import cpu_name
from mgd3.methods import SamplerConfig
from mgd3.run.profile import STAGES, StageProfile, matmul_peak


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mgd3")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--max-real-per-class", type=int, default=1000, help="0: every real image (official)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stage_profile.md"))
    ap.add_argument("--append", action="store_true", help="add this run's section to --out")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mgd3-stage-profile-"))
    os.environ["MGD3_CACHE_DIR"] = str(tmp / "cache")  # a first run: encoding included
    load_before = load_average()
    peak0 = matmul_peak()
    t = time.perf_counter()
    s = distill(DistillConfig(data="fashion-mnist", out=str(tmp / "out"), method=args.method, ipc=args.ipc,
                              max_real_per_class=args.max_real_per_class or None, progress=False,
                              sampler=SamplerConfig(steps=args.steps)))
    wall = time.perf_counter() - t
    peak1 = matmul_peak()
    load_after = load_average()
    import json

    m = json.loads((tmp / "out" / "manifest.json").read_text())
    prof = m["profile"]
    peak = max(peak0, peak1)
    real = f"--max-real-per-class {args.max_real_per_class}" if args.max_real_per_class else "every real image"
    lines = [
        f"## `mgd3 distill --data fashion-mnist --method {args.method} --ipc {args.ipc} --steps {args.steps}`, "
        f"{real}, fresh encoding cache",
        "",
        f"Command: `nice -n 10 python benchmarks/stage_profile.py {' '.join(sys.argv[1:])}`",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"load average (1, 5, 15 min) before {load_before}, after {load_after}.",
        f"fp32 matmul peak (2048³ `torch.mm`, best of 5): {peak0 / 1e9:.0f} GFLOP/s before the run, "
        f"{peak1 / 1e9:.0f} after; fractions below use the higher. Whole `distill` call: {wall:.1f} s "
        f"({s['images']} images).",
        "",
        "| stage | seconds | images | network rows | FLOP | GFLOP/s (stage wall) | fraction of peak | "
        "GFLOP/s inside the network calls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for st in STAGES:
        p = prof[st]
        lines.append(f"| {st} | {p['seconds']:.2f} | {p['images']} | {p['forwards']} | {p['flops']:.3g} | "
                     f"{p['gflop_per_s']:.1f} | {p['gflop_per_s'] * 1e9 / peak:.0%} | {p['model_gflop_per_s']:.1f} |")
    lines += ["", f"Logged line: `profile: {StageProfile.line(prof)}`", "",
              f"FLOPs per network row: {', '.join(f'{k} {v / 1e6:.1f} M' for k, v in prof['flops_per_row'].items())}.",
              ""]
    out = Path(args.out)
    head = ("# Stage profile of `mgd3 distill` against the measured matmul peak\n\n"
            "Produced by `benchmarks/stage_profile.py`; each section is one run.\n\n")
    old = out.read_text() if args.append and out.is_file() else head
    out.write_text(old + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
