"""Benchmark: the sampling path for a DiT-XL/2-size model on a GPU, as a fraction of the GPU's limit.

A randomly initialised DiT pipeline of DiT-XL/2-256's size (28 layers, 16 heads x 72 = 1152
wide, patch 2, 32x32x4 latents, 1000 classes; speed does not depend on the weights) is loaded
through mgd3's own DiT backend and sampled with mgd3's sampler, CFG 4.0 (two network rows per
image per step), for plain sampling and for MGD³ (mode guidance toward random targets with stop
guidance at half the steps), over:

- precision (default bf16 autocast, the backend's `--precision`),
- `torch.compile` of the transformer off / on,
- batch sizes (default 32 64 128 256 images; 2x the rows through the network with CFG).

For each: images/s, the network FLOPs (`mgd3.run.profile.dit_forward_flops`, x rows x steps) per
second, and that as a fraction of the measured matmul peak in the same process (a timed large
`torch.mm` in the benchmark's dtype). The attention processor diffusers uses (PyTorch SDPA:
`AttnProcessor2_0`) is recorded. Writes a markdown table.

    python benchmarks/gpu_path.py --device cuda                      # the real thing (a GPU)
    python benchmarks/gpu_path.py --tiny --device cpu --compile off  # a 2-layer smoke run
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mgd3.backends import load_backend
from mgd3.core.guidance import ModeGuidance, StopWindow
from mgd3.machine import cpu_name
from mgd3.run.profile import dit_forward_flops, matmul_peak
from mgd3.core.sampling import CFGDenoiser, Plan, sample
from mgd3.testing import build_dit_folder

XL2 = dict(num_classes=1000, image_channels=3, resolution=256, vae_levels=4, vae_width=32, layers=28, heads=16,
           head_dim=72, patch_size=2)
TINY = dict(num_classes=10, image_channels=3, resolution=32, vae_levels=4, vae_width=8, layers=2, heads=2,
            head_dim=8, patch_size=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(backend, plan, batch: int, method: str, seed: int = 0) -> float:
    """Seconds to sample `batch` images (all steps), after the caller's warm-up."""
    dev = backend.device
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    shape = tuple(backend.latent_shape)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)  # (B, C, h, w)
    cond = backend.cond([i % backend.num_classes for i in range(batch)])
    guidance = []
    if method == "mgd3":
        targets = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed + 10**6)).to(dev)
        guidance = [StopWindow(ModeGuidance(targets, 0.1), plan.steps // 2)]
    model = CFGDenoiser(backend.denoiser, 4.0, backend.uncond())
    sync(dev)
    t = time.perf_counter()
    sample(model, x, plan, cond, gens, sampler="ddpm", guidance=guidance)
    sync(dev)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model at 32 px (a smoke test of the script)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="default bf16 (fp32 with --tiny on a CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 32 64 128 256 (tiny: 2 4)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the best is kept)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--methods", nargs="+", default=["plain", "mgd3"])
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/gpu_path[_tiny].md)")
    args = ap.parse_args()

    device = torch.device(args.device)
    precision = args.precision or ("fp32" if args.tiny and device.type == "cpu" else "bf16")
    batches = args.batches or ([2, 4] if args.tiny else [32, 64, 128, 256])
    size = TINY if args.tiny else XL2
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu_path{'_tiny' if args.tiny else ''}.md")

    tmp = Path(tempfile.mkdtemp(prefix="mgd3-gpu-path-"))
    folder = build_dit_folder(tmp / "dit", **size)
    backend = load_backend(folder, device=str(device), precision=precision)
    eager = backend.transformer
    per_row = dit_forward_flops(eager.config)
    n_params = sum(p.numel() for p in eager.parameters())
    processor = type(eager.transformer_blocks[0].attn1.processor).__name__
    plan = Plan.from_betas(backend.betas, args.steps)
    peak_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    peak = matmul_peak(n=8192 if device.type == "cuda" and not args.tiny else 1024, device=device,
                       dtype=peak_dtype)
    print(f"model: {n_params / 1e6:.1f} M params, {per_row / 1e9:.2f} GFLOP per forward row; "
          f"attention: {processor}; {precision} matmul peak {peak / 1e12:.2f} TFLOP/s", flush=True)

    rows = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        backend.transformer = torch.compile(eager, dynamic=False) if compiled else eager
        for b in batches:
            for method in args.methods:
                try:
                    t0 = time.perf_counter()
                    run_once(backend, plan, b, method)  # warm-up (and compilation for this shape)
                    warm = time.perf_counter() - t0
                    best = min(run_once(backend, plan, b, method, seed=r + 1) for r in range(args.repeats))
                except torch.OutOfMemoryError:
                    rows.append((compiled, b, method, None, None, None, None))
                    print(f"compile={compiled} batch={b} {method}: out of memory", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                flops = per_row * 2 * b * args.steps  # CFG: 2 rows per image per step
                rate = flops / best
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                rows.append((compiled, b, method, b / best, rate, rate / peak, warm))
                print(f"compile={compiled} batch={b} {method}: {b / best:.2f} images/s, {rate / 1e9:.4g} GFLOP/s "
                      f"= {rate / peak:.1%} of peak (warm-up {warm:.1f} s, peak memory {mem:.1f} GiB)", flush=True)

    ratios = []
    for compiled in sorted({r[0] for r in rows}):
        for b in batches:
            t = {r[2]: r[3] for r in rows if r[0] == compiled and r[1] == b and r[3]}
            if "plain" in t and "mgd3" in t:
                ratios.append((compiled, b, t["plain"] / t["mgd3"]))

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [
        f"# GPU path: DiT-XL/2-size sampling{' (tiny smoke run)' if args.tiny else ''}",
        "",
        f"Command: `python benchmarks/gpu_path.py {' '.join(sys.argv[1:])}`",
        f"Machine: {dev_name} ({device.type}); torch {torch.__version__}, Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Model: random-init DiT, {n_params / 1e6:.1f} M transformer params, {size['resolution']} px "
        f"({size['resolution'] // 2 ** (size['vae_levels'] - 1)}² latents, patch {size['patch_size']}), "
        f"{per_row / 1e9:.3f} GFLOP per network row (`dit_forward_flops`); attention processor {processor}; "
        f"precision {precision}; {args.steps} DDPM steps, CFG 4.0; best of {args.repeats} after a warm-up.",
        f"Measured {precision} matmul peak: {peak / 1e12:.2f} TFLOP/s (timed `torch.mm` in this process).",
        "",
        "| torch.compile | batch | method | images/s | GFLOP/s | fraction of peak | warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for compiled, b, method, ips, rate, frac, warm in rows:
        if ips is None:
            lines.append(f"| {'on' if compiled else 'off'} | {b} | {method} | out of memory | | | |")
        else:
            lines.append(f"| {'on' if compiled else 'off'} | {b} | {method} | {ips:.2f} | {rate / 1e9:.4g} | "
                         f"{frac:.1%} | {warm:.1f} |")
    if ratios:
        lines += ["", "MGD³ / plain time per setting: " + ", ".join(
            f"compile {'on' if c else 'off'} batch {b}: {r:.3f}" for c, b, r in ratios) + "."]
    best = max((r for r in rows if r[3]), key=lambda r: r[3], default=None)
    if best:
        lines += ["", f"Fastest: torch.compile {'on' if best[0] else 'off'}, batch {best[1]} ({best[2]}): "
                      f"{best[3]:.2f} images/s, {best[5]:.1%} of the {precision} matmul peak."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    if not math.isfinite(peak):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
