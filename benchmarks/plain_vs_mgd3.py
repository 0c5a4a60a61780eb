"""Benchmark: plain sampling vs MGD³, each a whole fresh `mgd3 distill` process, in interleaved
pairs (plain, MGD³, MGD³, plain, ...), so load on a shared machine falls on both alike.

Guidance adds work, so MGD³ should take at least plain's time and at most ~2 % more. Reports per
run the generate stage's wall time and, from the manifest's stage profile, its CPU user and
system seconds and minor page faults (all threads of the process), and the median of the per-pair
ratios MGD³ / plain. Encodings are cached by a first run, so `prepare` is mode discovery only.
With --in-process every run is a `mgd3.run.driver` call in this one process, on one loaded model:
what is left of the ratio is the methods' own work, without the spread between processes (where
the interpreter, the allocator and the CPU caches start from). Writes
benchmarks/results/plain_vs_mgd3.md (or --out).

    nice -n 10 python benchmarks/plain_vs_mgd3.py [--pairs 5] [--steps 10] [--classes 0 1 2] [--in-process]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mgd3.machine import cpu_name

sys.path.insert(0, str(Path(__file__).parent))
from results_file import append_section  # noqa: E402


def run(args, method: str, out: Path, env: dict) -> dict:
    if args.in_process:
        return run_in_process(args, method, out, env)
    cmd = [sys.executable, "-m", "mgd3", "distill", "--data", "fashion-mnist", "--ipc", str(args.ipc),
           "--steps", str(args.steps), "--max-real-per-class", str(args.max_real_per_class), "--method", method,
           "--cfg", str(args.cfg),
           "--out", str(out), "--overwrite", "--quiet"]
    if args.classes:
        cmd += ["--classes", *args.classes]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return _result(json.loads((out / "manifest.json").read_text()), wall, out)


def _result(m: dict, wall: float, out: Path) -> dict:
    """What a row reports, from a run's manifest (its stage profile) and its folder."""
    g = m["profile"]["generate"]
    return {"wall": wall, "generate": m["timing_s"]["generate"], "user": g["cpu_user_s"],
            "system": g["cpu_system_s"], "faults": g["minor_faults"], "load": os.getloadavg()[0],
            "latents": (out / "latents.pt").read_bytes()}


_MODEL = None


def run_in_process(args, method: str, out: Path, env: dict) -> dict:
    global _MODEL
    import mgd3
    from mgd3.api import load_model

    if _MODEL is None:
        _MODEL = load_model("fashion-mnist")
    kw = dict(ipc=args.ipc, steps=args.steps, max_real_per_class=args.max_real_per_class, overwrite=True, cfg=args.cfg,
              cache_dir=env["MGD3_CACHE_DIR"], model=_MODEL, progress=False)
    if args.classes:
        kw["classes"] = list(args.classes)
    t = time.perf_counter()
    s = mgd3.distill("fashion-mnist", out, method=method, **kw)
    wall = time.perf_counter() - t
    return _result(s.manifest, wall, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--classes", nargs="*", default=None, help="default every class")
    ap.add_argument("--max-real-per-class", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plain_vs_mgd3.md"))
    ap.add_argument("--cfg", type=float, default=1.5, help="CFG of both methods (default 1.5, so a model's "
                    "per-method recommendation cannot give them different settings)")
    ap.add_argument("--in-process", action="store_true", help="every run a mgd3.run.driver call in this process")
    ap.add_argument("--repeat-plain", type=int, metavar="N",
                    help="instead: run plain N times as whole processes (the spread between processes alone)")
    ap.add_argument("--note", default="", help="a line added under the table (what code was measured)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mgd3-plain-vs-mgd3-"))
    env = dict(os.environ, MGD3_CACHE_DIR=str(tmp / "cache"))
    run(args, "mgd3", tmp / "warm", env)  # fills the encoding cache
    if args.repeat_plain:
        times = [run(args, "plain", tmp / f"plain-{i}", env)["generate"] for i in range(args.repeat_plain)]
        aa = [b / a for a, b in zip(times[::2], times[1::2])]
        text = (f"## One command, {len(times)} whole processes\n\nCommand: `nice -n 10 python benchmarks/plain_vs_mgd3.py "
                f"{' '.join(sys.argv[1:])}`; {cpu_name()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
                f"UTC, load {os.getloadavg()[0]:.1f}.\nplain generate s: {', '.join(f'{t:.2f}' for t in times)} (median "
                f"{statistics.median(times):.2f}, max/min {max(times) / min(times):.3f}); consecutive runs as A/A pairs: "
                f"{', '.join(f'{x:.3f}' for x in aa)}.\n")
        if args.note:
            text += "\n" + args.note + "\n"
        out = Path(args.out)
        out.write_text((out.read_text() if out.is_file() else "") + text + "\n")
        print(text)
        return
    rows, ratios = [], []
    first = {}
    for p in range(args.pairs):
        order = ("plain", "mgd3") if p % 2 == 0 else ("mgd3", "plain")
        got = {}
        for method in order:
            got[method] = run(args, method, tmp / f"{method}-{p}", env)
            if method in first:
                assert got[method]["latents"] == first[method], f"{method}: the latents changed between runs"
            first.setdefault(method, got[method]["latents"])
            r = got[method]
            rows.append((p, method, r))
            print(f"pair {p} {method}: generate {r['generate']:.2f} s (user {r['user']:.2f}, system "
                  f"{r['system']:.2f}, {r['faults']} minor faults), process {r['wall']:.1f} s, load {r['load']:.1f}",
                  flush=True)
        ratios.append(got["mgd3"]["generate"] / got["plain"]["generate"])

    def med(method, key):
        return statistics.median(r[key] for _, m, r in rows if m == method)

    lines = [
        "## plain vs MGD³, " + ("`mgd3.run.driver` calls in one process" if args.in_process else "whole processes")
        + " in interleaved pairs",
        "",
        f"Command: `nice -n 10 python benchmarks/plain_vs_mgd3.py {' '.join(sys.argv[1:])}`",
        f"Machine: {cpu_name()}, torch threads per process as default, Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Run: fashion-mnist, shipped model, "
        f"IPC {args.ipc}, {args.steps} DDPM steps, CFG {args.cfg:g} for both, classes {' '.join(args.classes) if args.classes else 'all'};"
        " encodings cached.",
        "",
        "| pair | method | generate s | CPU user s | CPU system s | minor faults | process s | load (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, method, r in rows:
        lines.append(f"| {p} | {method} | {r['generate']:.2f} | {r['user']:.2f} | {r['system']:.2f} | {r['faults']} | "
                     f"{r['wall']:.1f} | {r['load']:.1f} |")
    if args.in_process:
        lines = [x.replace("process s", "call s") for x in lines]
    lines += [
        "",
        f"Median generate: plain {med('plain', 'generate'):.2f} s, MGD³ {med('mgd3', 'generate'):.2f} s; "
        f"median of the per-pair ratios MGD³ / plain: **{statistics.median(ratios):.3f}** "
        f"(pairs: {', '.join(f'{x:.3f}' for x in ratios)}). Median CPU system s: plain {med('plain', 'system'):.2f}, "
        f"MGD³ {med('mgd3', 'system'):.2f}; minor faults: plain {med('plain', 'faults'):.0f}, "
        f"MGD³ {med('mgd3', 'faults'):.0f}. Every run of a method wrote byte-identical latents.",
    ]
    append_section(args.out, "plain vs MGD³ sampling time", lines, args.note)


if __name__ == "__main__":
    main()
