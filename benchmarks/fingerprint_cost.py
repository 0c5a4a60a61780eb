"""What the image-folder fingerprint and the unusable-file check cost per file, extrapolated to
ImageNet-1K's train split (1 281 167 files, ~110 KB JPEGs on average).

Measured on N synthetic JPEGs of ImageNet's typical size (500x375, quality 90), in one class folder
(page cache warm: the second of two passes is timed):
- listing key (what keys cached encodings): names, sizes, mtimes, ctimes and inodes (one stat each);
- a full content hash (sha256 of every byte), the alternative the listing key avoids;
- the unusable-file check of skip/`--strict` mode (`mgd3.images.image_problem`: header, budget, a JPEG's
  end-of-image marker; PNGs are decoded), run once per listing and cached.

Run: PYTHONPATH=src python benchmarks/fingerprint_cost.py [N]   (appends to results/fingerprint_cost.md)
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import append_section  # noqa: E402

IMAGENET_FILES = 1_281_167


def timed(fn, n) -> float:
    fn()  # warm the page cache
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main(n: int = 2000) -> None:
    from mgd3.io.folders import _scan
    from mgd3.images import image_problem

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mgd3-fp-") as tmp:
        cls = Path(tmp) / "n01440764"
        cls.mkdir()
        base = (rng.random((375, 500, 3)) * 40 + np.linspace(0, 200, 500)[None, :, None]).astype(np.uint8)
        for i in range(n):
            Image.fromarray(np.roll(base, i, axis=1)).save(cls / f"{i:06d}.JPEG", quality=90)
        files = sorted(cls.iterdir())
        mean_kb = sum(f.stat().st_size for f in files) / n / 1024

        def listing():
            _scan(Path(tmp), ["n01440764"])

        def content():
            h = hashlib.sha256()
            for f in files:
                with open(f, "rb") as fh:
                    h.update(fh.read())

        def check():
            for f in files:
                assert image_problem(f, 256) is None

        rows = [("listing key (stat: size, mtime, ctime, inode)", timed(listing, n)),
                ("full content hash (sha256 of every byte)", timed(content, n)),
                ("unusable-file check (header, budget, JPEG end marker; once per listing)", timed(check, n))]
    lines = [f"{n} JPEGs of 500x375 ({mean_kb:.0f} KB mean), {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, one process, page cache warm; command: "
             f"`PYTHONPATH=src python benchmarks/fingerprint_cost.py {n}`", "",
             "| what | files/s | ImageNet-1K train (1 281 167 files) |", "|---|---:|---:|"]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:,.0f} | {IMAGENET_FILES / rate / 60:,.1f} min |")
    append_section(Path(__file__).resolve().parent / "results" / "fingerprint_cost.md",
                   "Image-folder fingerprint and check: cost per file", lines,
                   "The listing key changes whenever a file is written (its ctime), so two folders of equal names, "
                   "sizes and mtimes (a tar extraction) never share cached encodings, at the cost of one stat per "
                   "file; a full content hash reads every byte on every run.")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
