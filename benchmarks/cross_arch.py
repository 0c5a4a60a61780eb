"""Benchmark: the IPC 10 cells of the Fashion-MNIST grid evaluated with other networks.

Every dataset-distillation paper reports how a set transfers to networks it was not chosen with;
MGD³'s own ablation uses ConvNet-6, ResNetAP-10 and ResNet-18. This script distills the grid's IPC 10
sets with exactly the grid's commands (the variants of `benchmarks/fmnist_table.py`: same
arguments, batch size 50, 1000 real images per class, generation seeds 0/1/2), so each set is the one
the grid scored with ConvNet-3, then runs `mgd3 evaluate --protocol dc --arch A` on it (the same
`dc` schedule: 300 epochs, SGD, no augmentation; evaluation seed 0, one thread per job).

    python benchmarks/cross_arch.py --archs convnet-6 [--variants random-real plain mgd3 ...] [--jobs 2]

Sets and eval files live under --root (default runs/cross-arch; never committed); the table is
appended to benchmarks/results/cross_arch.md. Finished evaluations are reused, so an interrupted
run continues where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fmnist_table import SEEDLESS, VARIANTS  # noqa: E402  the grid's own variant arguments

from mgd3.machine import cpu_name  # noqa: E402
from results_file import append_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["random-real", "kmeans-real", "plain", "mgd3", "mgd3-recommended"]


def sh(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{' '.join(cmd[2:6])} ... failed: {tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["convnet-6"])
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--gen-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--root", default=str(REPO / "runs" / "cross-arch"))
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cross_arch.md"))
    args = ap.parse_args()
    root = Path(args.root)
    t0 = time.perf_counter()
    cells = [(v, s) for v in args.variants for s in (args.gen_seeds[:1] if v in SEEDLESS else args.gen_seeds)]

    def set_dir(v: str, s: int) -> Path:
        return root / "sets" / f"{v}-ipc{args.ipc}-s{s}"

    def distill(v: str, s: int) -> None:
        d = set_dir(v, s)
        if (d / "manifest.json").is_file():
            return
        sh([sys.executable, "-m", "mgd3", "distill", "--data", "fashion-mnist", "--ipc", str(args.ipc), "--seed",
            str(s), "--out", str(d), "--batch-size", "50", "--max-real-per-class", "1000", "--quiet", "--device",
            "cpu", "--overwrite", *VARIANTS[v][0]])

    def evaluate(v: str, s: int, arch: str) -> float:
        f = set_dir(v, s) / "evals" / f"dc-{arch}-cross.json"
        if not f.is_file():
            sh([sys.executable, "-m", "mgd3", "evaluate", str(set_dir(v, s)), "--protocol", "dc", "--arch", arch,
                "--seeds", "0", "--threads", "1", "--out", str(f), "--quiet", "--device", "cpu"])
        return float(json.loads(f.read_text())["runs"][0]["final_acc"])

    def job(cell):
        v, s = cell
        distill(v, s)
        got = {a: evaluate(v, s, a) for a in args.archs}
        print(f"{v} seed {s}: " + ", ".join(f"{a} {x:.2f}" for a, x in got.items()), flush=True)
        return cell, got

    distill(*cells[0])  # fills the encoding cache before jobs run side by side
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        results = dict(ex.map(job, cells))

    lines = [f"## IPC {args.ipc}, `dc`, evaluated with {', '.join(args.archs)}", "",
             f"Command: `python benchmarks/cross_arch.py {' '.join(sys.argv[1:])}`",
             f"Machine: {cpu_name()}, one torch thread per evaluation, {args.jobs} jobs, Python "
             f"{platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"{(time.perf_counter() - t0) / 60:.0f} min. Each cell: mean ± std (ddof 0) over generation seeds "
             f"{'/'.join(map(str, args.gen_seeds))}, evaluation seed 0; the signed number is the difference to "
             "random real of the same network.", "",
             "| set | " + " | ".join(args.archs) + " |", "|---|" + "---|" * len(args.archs)]
    means = {}
    for v in args.variants:
        for a in args.archs:
            xs = [results[(v, s)][a] for s in args.gen_seeds if (v, s) in results]
            means[(v, a)] = (statistics.mean(xs), statistics.pstdev(xs), xs)
    for v in args.variants:
        row = []
        for a in args.archs:
            m, sd, xs = means[(v, a)]
            ref = means.get(("random-real", a))
            diff = f" ({m - ref[0]:+.1f})" if ref and v != "random-real" else ""
            row.append(f"{m:.2f} ± {sd:.2f}{diff} ({' / '.join(f'{x:.2f}' for x in xs)})" if len(xs) > 1
                       else f"{m:.2f}{diff}")
        lines.append(f"| {v}: {VARIANTS[v][1]} | " + " | ".join(row) + " |")
    append_section(args.out, "Cross-architecture evaluation of the Fashion-MNIST sets", lines, args.note)
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; {os.getloadavg()[0]:.1f} load")


if __name__ == "__main__":
    main()
