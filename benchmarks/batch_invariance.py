"""Benchmark: how much an image depends on `--batch-size` (1 vs 7) through the real CLI.

Every image has its own generator, so the noise is the same at any batch size; what differs is
the rounding of batched matrix products (a CPU or GPU kernel may block a GEMM differently for
2 rows than for 14). This measures the effect on the tiny DiT of the tests (digits layout,
learned sigma, 1×8×8 images, 4×4×4 latents) and on a DiT of the shipped model's size
(28×28 Fashion-MNIST layout): max |Δ latent| and the PNGs' gray-level differences.

    nice -n 10 .venv/bin/python benchmarks/batch_invariance.py [--steps 50] [--ipc 7]

Writes benchmarks/results/batch_invariance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mgd3.machine import cpu_name
from mgd3.testing import build_dit_folder

MODELS = {
    "tiny DiT (tests' digits model, 8 px, 2 layers)": dict(
        num_classes=10, image_channels=1, resolution=8, class_names=[str(i) for i in range(10)]),
    "Fashion-MNIST-size DiT (28 px, 4 layers, 4 heads × 32, patch 1)": dict(
        num_classes=10, image_channels=1, resolution=28, vae_levels=3, vae_width=32, layers=4, heads=4,
        head_dim=32, patch_size=1, class_names=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}


def run(model: Path, data: str, out: Path, batch: int, args, method: str) -> None:
    cmd = [sys.executable, "-m", "mgd3", "distill", "--data", data, "--model", str(model), "--method", method,
           "--ipc", str(args.ipc), "--steps", str(args.steps), "--batch-size", str(batch), "--out", str(out),
           "--classes", *map(str, range(args.classes)),
           "--quiet", "--device", "cpu", "--sampler", args.sampler]
    subprocess.run(cmd, check=True, env=dict(os.environ, MGD3_CACHE_DIR=str(out.parent / "cache")))


def compare(a: Path, b: Path) -> dict:
    la = torch.load(a / "latents.pt", weights_only=True)["latents"]
    lb = torch.load(b / "latents.pt", weights_only=True)["latents"]
    pngs = sorted(p.relative_to(a) for p in (a / "images").rglob("*.png"))
    differing, max_gray, pixels = 0, 0, 0
    for p in pngs:
        x = np.asarray(Image.open(a / p), dtype=np.int16)
        y = np.asarray(Image.open(b / p), dtype=np.int16)
        d = np.abs(x - y)
        if d.any():
            differing += 1
            pixels += int((d > 0).sum())
            max_gray = max(max_gray, int(d.max()))
    rel = float(((la - lb).abs() / la.abs().clamp_min(1.0)).max())
    return {"images": len(pngs), "latent_max": float((la - lb).abs().max()), "latent_rel": rel,
            "latent_scale": float(la.abs().max()), "latent_equal": bool(torch.equal(la, lb)),
            "pngs_differing": differing, "pixels_differing": pixels, "max_gray": max_gray,
            "pixels_total": len(pngs) * int(np.asarray(Image.open(a / pngs[0])).size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ipc", type=int, default=7)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--classes", type=int, default=3, help="the first N classes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_invariance.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mgd3-batchinv-"))
    rows = []
    for name, kw in MODELS.items():
        model = build_dit_folder(tmp / f"model-{len(rows)}", **kw)
        data = "digits" if kw["resolution"] == 8 else "fashion-mnist"
        for method in ("plain", "mgd3"):
            outs = {}
            for b in (1, args.ipc):
                outs[b] = tmp / f"{len(rows)}-{method}-b{b}"
                run(model, data, outs[b], b, args, method)
            r = compare(outs[1], outs[args.ipc])
            r.update(model=name, method=method, data=data)
            rows.append(r)
            print(r, flush=True)
    write_md(rows, args)


def write_md(rows: list[dict], args) -> None:
    lines = [
        "# Batch size and the images: `--batch-size 1` vs `--batch-size " f"{args.ipc}`",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()}; torch {torch.__version__}, "
        f"device cpu, fp32",
        f"- command: `nice -n 10 .venv/bin/python benchmarks/batch_invariance.py --steps {args.steps} --ipc {args.ipc} "
        f"--sampler {args.sampler} --classes {args.classes}` (each run: `mgd3 distill --data D --model M --method X "
        f"--ipc {args.ipc} --steps {args.steps} --batch-size B --classes 0 … {args.classes - 1}`)",
        "- the noise is identical (one generator per image); the difference is the rounding of batched "
        "matrix products",
        "",
        "| model | data | method | images | max abs latent | max abs Δ latent | max Δ / max(1, abs latent) | "
        "PNGs that differ | pixels that differ | max Δ gray level |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['data']} | {r['method']} | {r['images']} | {r['latent_scale']:.0f} | "
                     f"{r['latent_max']:.1e} | {r['latent_rel']:.1e} | "
                     f"{r['pngs_differing']} | {r['pixels_differing']} of {r['pixels_total']} | {r['max_gray']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
