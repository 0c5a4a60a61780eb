"""Benchmark: byte identity of distilled sets across a refactor.

Runs a fixed list of small `mgd3 distill` runs on the shipped Fashion-MNIST model through the real
CLI — every method (plain, mgd3, d4m, dmgd, dm, random-real, kmeans-real), DDPM and DDIM, one
torchrun launch of two processes and one run interrupted and resumed — and prints one SHA-256 per
run over its PNG bytes, its latents.pt tensors and its manifest with the fields that legitimately
change between two runs left out (timings, the stage profile, the git commit, the mgd3 version).
Two checkouts that print the same table write the same sets.

    python benchmarks/refactor_identity.py --work /tmp/identity [--out benchmarks/results/refactor_identity.md]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

COMMON = ["--data", "fashion-mnist", "--classes", "0", "7", "--ipc", "3", "--max-real-per-class", "40",
          "--steps", "6", "--batch-size", "2", "--quiet", "--device", "cpu"]
RUNS: dict[str, list[str]] = {
    "plain-ddpm": ["--method", "plain"],
    "plain-ddim": ["--method", "plain", "--sampler", "ddim"],
    "mgd3-ddpm": ["--method", "mgd3", "--t-stop", "3"],
    "mgd3-ddim": ["--method", "mgd3", "--sampler", "ddim", "--lambda", "0.3"],
    "d4m": ["--method", "d4m"],
    "dmgd": ["--method", "dmgd"],
    "dm": ["--method", "dm", "--iterations", "3", "--batch-real", "8"],
    "random-real": ["--method", "random-real"],
    "kmeans-real": ["--method", "kmeans-real"],
}
# manifest fields that differ between two identical runs
VOLATILE = {"timing_s", "profile", "git_commit", "mgd3_version", "created", "command", "version", "git", "resumed_images"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def set_hash(out: Path) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the PNG bytes, the latents and the stable manifest fields."""
    h_png = hashlib.sha256()
    for p in sorted((out / "images").rglob("*.png")):
        h_png.update(str(p.relative_to(out)).encode())
        h_png.update(p.read_bytes())
    h_lat = hashlib.sha256()
    if (out / "latents.pt").is_file():
        lat = torch.load(out / "latents.pt", weights_only=True)
        h_lat.update(lat["latents"].contiguous().numpy().tobytes())
        h_lat.update(json.dumps([lat["paths"], lat["labels"]]).encode())
    manifest = json.loads((out / "manifest.json").read_text())
    h_man = hashlib.sha256(json.dumps(_strip(manifest), sort_keys=True).encode())
    return {"png": h_png.hexdigest()[:16], "latents": h_lat.hexdigest()[:16] if (out / "latents.pt").is_file() else "-",
            "manifest": h_man.hexdigest()[:16]}


def mgd3_cmd() -> list[str]:
    return [sys.executable, "-m", "mgd3", "distill"]


def run(args: list[str], env: dict) -> None:
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{p.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (removed first)")
    ap.add_argument("--out", help="append the table to this Markdown file")
    ap.add_argument("--only", nargs="*", help="run only these names")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "MGD3_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    rows = {}
    t0 = time.perf_counter()
    for name, extra in RUNS.items():
        if args.only and name not in args.only:
            continue
        out = work / name
        run(mgd3_cmd() + COMMON + extra + ["--out", str(out)], env)
        rows[name] = set_hash(out)
    if not args.only or "torchrun-2" in args.only:
        out = work / "torchrun-2"
        run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29613",
             "-m", "mgd3", "distill"] + COMMON + ["--method", "mgd3", "--out", str(out)], env)
        rows["torchrun-2 (mgd3)"] = set_hash(out)
    if not args.only or "resumed" in args.only:
        out = work / "resumed"
        # interrupted: killed (SIGKILL) once its first batch is on disk, then the same command again
        p = subprocess.Popen(mgd3_cmd() + COMMON + ["--method", "mgd3", "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and not list((out / ".partial").glob("*.pt")):
            time.sleep(0.01)
        p.kill()
        p.wait()
        partial = len(list((out / "images").rglob("*.png"))) if (out / "images").is_dir() else 0
        run(mgd3_cmd() + COMMON + ["--method", "mgd3", "--out", str(out)], env)
        rows[f"resumed (mgd3; {partial} images before)"] = set_hash(out)
    lines = ["| run | PNG bytes | latents | manifest (stable fields) |", "|---|---|---|---|"]
    lines += [f"| {k} | `{v['png']}` | `{v['latents']}` | `{v['manifest']}` |" for k, v in rows.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        head = (f"\nCommand: `python benchmarks/refactor_identity.py --work WORK --out {args.out}` at "
                f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}; "
                f"{platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}; "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
                f"{time.perf_counter() - t0:.0f} s.\n\n")
        with open(args.out, "a") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
