"""Benchmark: what guidance and batching cost in `mgd3 distill`.

1. mgd3 vs plain sampling wall time (same model, seeds, batch): goal ratio <= 1.02.
2. Batched vs batch-1 generation throughput (images/s): goal >= 10x.

The model is a randomly initialised DiT pipeline of the shipped model's size (28x28x1 images,
4x7x7 latents, 4 layers, 4 heads x 32, patch 1, learned sigma): speed does not depend on the
weights. Data: Fashion-MNIST (real), IPC 10. Writes benchmarks/results/distill_speed.md.

    .venv/bin/python benchmarks/distill_speed.py [--repeats 3] [--steps 50]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mgd3.run.driver import DistillConfig, distill
from mgd3.machine import cpu_name
from mgd3.methods import SamplerConfig
from mgd3.testing import build_dit_folder




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--single-images", type=int, default=10, help="images generated at batch size 1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_speed.md"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mgd3-bench-"))
    os.environ.setdefault("MGD3_CACHE_DIR", str(tmp / "cache"))
    model = build_dit_folder(tmp / "model", num_classes=10, image_channels=1, resolution=28, vae_levels=3,
                             vae_width=32, layers=4, heads=4, head_dim=32, patch_size=1,
                             class_names=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                          "Shirt", "Sneaker", "Bag", "Ankle boot"])
    n_params = sum(p.numel() for p in __import__("mgd3.backends", fromlist=["x"]).load_backend(model)
                   .transformer.parameters())
    sampler = SamplerConfig(steps=args.steps, cfg=4.0)

    def run(method, ipc=10, batch=args.batch, classes=None, tag="x"):
        out = tmp / f"{method}-{tag}-{time.monotonic_ns()}"
        s = distill(DistillConfig(data="fashion-mnist", out=str(out), model=str(model), method=method, ipc=ipc,
                                  batch_size=batch, classes=classes, sampler=sampler, progress=False,
                                  device=args.device))
        return s

    run("mgd3", ipc=1, tag="warm")  # encodes Fashion-MNIST once (cached) and warms up
    gen = {"plain": [], "mgd3": []}
    total = {"plain": [], "mgd3": []}
    prep = []
    for _ in range(args.repeats):
        for method in ("plain", "mgd3"):
            s = run(method)
            gen[method].append(s["timing"]["generate"])
            total[method].append(s["timing"]["total"])
            if method == "mgd3":
                prep.append(s["timing"]["prepare"])
    med = {k: statistics.median(v) for k, v in gen.items()}
    ratio = med["mgd3"] / med["plain"]

    n1 = args.single_images
    single = run("plain", ipc=n1, batch=1, classes=["Coat"], tag="b1")
    ips_1 = n1 / single["timing"]["generate"]
    ips_b = 100 / med["plain"]
    speedup = ips_b / ips_1

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# distill speed: guidance overhead and batching",
        "",
        f"Command: `python benchmarks/distill_speed.py {' '.join(sys.argv[1:])}`",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, device {device_name}, torch {torch.__version__}, "
        f"Python {platform.python_version()}; measured {now}.",
        f"Model: random-init DiT pipeline of the shipped size ({n_params / 1e6:.2f} M transformer params, "
        "28x28x1 images, 4x7x7 latents, patch 1, learned sigma); Fashion-MNIST, IPC 10 (100 images), "
        f"{args.steps} DDPM steps, CFG 4.0 (2 network passes per step), batch {args.batch}.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| plain sampling, 100 images (median of {args.repeats}) | {med['plain']:.2f} s | |",
        f"| mgd3 sampling, 100 images (median of {args.repeats}) | {med['mgd3']:.2f} s | |",
        f"| **mgd3 / plain sampling time** | **{ratio:.3f}** | <= 1.02 |",
        f"| mgd3 mode discovery (cached encodings, k-means of 10 classes) | {statistics.median(prep):.2f} s | |",
        f"| mgd3 / plain end to end (incl. mode discovery, decode, PNG writes) | "
        f"{statistics.median(total['mgd3']) / statistics.median(total['plain']):.3f} | |",
        f"| batch-1 generation | {ips_1:.2f} images/s ({n1} images) | |",
        f"| batch-{args.batch} generation | {ips_b:.2f} images/s | |",
        f"| **batched / batch-1 throughput** | **{speedup:.1f}x** | >= 10x |",
        "",
        "Sampling time = the method's generate calls (model passes, guidance, noise); decode and PNG writes",
        "are counted in the end-to-end row. Raw runs (s): "
        f"plain {[round(x, 2) for x in gen['plain']]}, mgd3 {[round(x, 2) for x in gen['mgd3']]}.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
