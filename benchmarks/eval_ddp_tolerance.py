"""How far one DDP training over two processes (`torchrun ... mgd3 evaluate --dist-mode ddp`)
lands from the one-process training with the same global batch and seed, on the CPU (gloo).

For each protocol: a distilled-set stand-in (IPC real digits images per class, hand-written
manifest), `mgd3 evaluate` in one process and over two DDP processes, both with one torch
thread; the table lists the final and every periodic evaluation's test accuracy difference. The networks use instance norm (no batch statistics), and every
process draws the same augmentations, so the only difference is the order of the gradient sums
(DDP sums per-process partial gradients, one process sums the whole batch).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_ddp_tolerance.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CASES = [  # protocol, extra flags
    ("dc", ["--epochs", "40"]),
    ("minimax", ["--arch", "convnet-3", "--epochs", "40", "--option", "eval_every=5"]),
    ("soft", ["--arch", "convnet-3", "--epochs", "40", "--teacher-epochs", "2", "--option", "eval_every=5",
              "--option", "eval_after=0"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list, env: dict) -> None:
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_ddp_tolerance.md"))
    a = ap.parse_args()
    from test_evaluate import write_set

    from mgd3.machine import cpu_name

    tmp = Path(tempfile.mkdtemp(prefix="ddp-tol-"))
    s = write_set(tmp / "set", ipc=a.ipc)
    env = dict(os.environ, OMP_NUM_THREADS="1", MGD3_CACHE_DIR=str(tmp / "cache"),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--seeds", *a.seeds, "--batch-size", a.batch_size, "--threads", 1, "--device", "cpu", "--quiet"]
    rows, worst = [], 0.0
    for proto, extra in CASES:
        one, two = tmp / f"{proto}-one.json", tmp / f"{proto}-ddp.json"
        run([sys.executable, "-m", "mgd3", "evaluate", s, "--protocol", proto, *extra, *common, "--out", one], env)
        run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
             "--master-port", free_port(), "-m", "mgd3", "evaluate", s, "--protocol", proto, *extra, *common,
             "--dist-mode", "ddp", "--out", two], env)
        r1, r2 = (json.loads(f.read_text()) for f in (one, two))
        for x, y in zip(r1["runs"], r2["runs"]):
            diffs = [abs(u[1] - v[1]) for u, v in zip(x["evaluations"], y["evaluations"])]
            worst = max(worst, max(diffs))
            rows.append(f"| {proto} | {x['seed']} | {len(diffs)} | {x['final_acc']:.2f} | {y['final_acc']:.2f} | "
                        f"{y['final_acc'] - x['final_acc']:+.2f} | {max(diffs):.2f} | "
                        f"{sum(d == 0 for d in diffs)} / {len(diffs)} |")
        rows.append(f"| {proto} | mean | | {r1['mean']:.2f} | {r2['mean']:.2f} | {r2['mean'] - r1['mean']:+.2f} | | |")
    text = "\n".join([
        "# DDP over two processes vs one process (`mgd3 evaluate --dist-mode ddp`, gloo, CPU)",
        "",
        f"Digits, IPC {a.ipc} real images per class as the set ({10 * a.ipc} images), global batch "
        f"{a.batch_size} (16 images per process), seeds {' '.join(map(str, a.seeds))}, one torch thread per "
        f"process, 360 test images (one image = 0.28 points). Machine: {cpu_name()}, "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.",
        "",
        "| protocol | seed | evaluations | one process | DDP, 2 processes | final Δ | largest \\|Δ\\| of any "
        "evaluation | equal evaluations |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Largest difference of any evaluation: **{worst:.2f} points**.",
        "",
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_ddp_tolerance.py "
        f"--ipc {a.ipc} --batch-size {a.batch_size} --seeds {' '.join(map(str, a.seeds))}`",
        "",
    ])
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
