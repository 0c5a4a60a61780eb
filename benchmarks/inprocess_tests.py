"""Method-matrix tests through subprocesses (`python -m mgd3 distill`) against the same tests
calling `mgd3.cli.main()` in-process: wall and CPU seconds, ABBA order to cancel load drift.

    python benchmarks/inprocess_tests.py --old-rev 60c36cc --out benchmarks/results/inprocess_tests.md

The old test file is taken from git (`--old-rev`), the new one from the working tree; both run
against the working tree's src/ with the same -k selection.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree(kind: str, rev: str, work: Path) -> Path:
    d = work / kind
    (d / "tests").mkdir(parents=True)
    for f in ("conftest.py", "inprocess.py"):
        if (ROOT / "tests" / f).is_file():
            shutil.copy(ROOT / "tests" / f, d / "tests" / f)
    if kind == "old":
        text = subprocess.run(["git", "show", f"{rev}:tests/test_methods.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (d / "tests" / "test_methods.py").write_text(text)
    else:
        shutil.copy(ROOT / "tests" / "test_methods.py", d / "tests" / "test_methods.py")
    shutil.copy(ROOT / "pyproject.toml", d / "pyproject.toml")
    return d


def _run(tree: Path, select: str) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods.py",
                        "-k", f"every_method and {select}"], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", required=True, help="git revision whose tests/test_methods.py uses subprocesses")
    ap.add_argument("--select", default="plain or random", help="-k selection within the method matrix")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from mgd3.machine import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        trees = {k: _tree(k, args.old_rev, Path(tmp)) for k in ("old", "new")}
        rows = []
        for kind, sampler in (("old", "ddpm"), ("new", "ddpm"), ("new", "ddim"), ("old", "ddim")):
            wall, cpu, rc = _run(trees[kind], f"{sampler} and ({args.select})")
            rows.append((kind, sampler, wall, cpu, rc))
            print(f"{kind} {sampler}: {wall:.1f} s wall, {cpu:.1f} s CPU, rc {rc}", flush=True)
    tot = {k: (sum(r[2] for r in rows if r[0] == k), sum(r[3] for r in rows if r[0] == k)) for k in ("old", "new")}
    lines = ["# Method-matrix tests: subprocess vs in-process main()", "",
             f"Command: `python benchmarks/inprocess_tests.py --old-rev {args.old_rev}` (selection "
             f"`every_method and (ddpm|ddim) and ({args.select})`), machine: {cpu_name()}, "
             f"{os.cpu_count()} CPUs.", "",
             "| run (ABBA order) | tests | wall s | CPU s (children) | rc |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {s} | {w:.1f} | {c:.1f} | {rc} |" for k, s, w, c, rc in rows]
    lines += ["", f"Total: old (subprocess) {tot['old'][0]:.1f} s wall / {tot['old'][1]:.1f} s CPU; "
              f"new (in-process) {tot['new'][0]:.1f} s wall / {tot['new'][1]:.1f} s CPU."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
