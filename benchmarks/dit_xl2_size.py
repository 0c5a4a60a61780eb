"""Benchmark: `mgd3 distill` at DiT-XL/2 size — per-step time and peak memory.

Builds a randomly initialised DiT-XL/2 (`DiTTransformer2DModel`: 28 layers, 16 heads × 72,
patch 2, 4 → 8 channels (learned sigma), 1000 classes, 32×32 latents) and an `AutoencoderKL`
with the SD VAE config (the one DiT-XL/2-256 ships), saves them as a `facebook/DiT-XL-2-256`
folder in a temporary directory, writes a synthetic ImageNette-shaped folder (10 wnid class
folders of 320×256 JPEGs), and runs the real CLI, `mgd3 distill --method mgd3 --cfg 4
--cfg-channels 3`, once per batch size in its own process (peak RSS is per process). Speed and
memory do not depend on the weights.

Per run it reports: the time of one sampling step (the transformer's forward on the CFG-doubled
batch, timed around the backend's denoiser), VAE encode and decode time per image, the wall time
of the whole command and the process's peak RSS (CPU) or peak CUDA memory (GPU).

    nice -n 10 .venv/bin/python benchmarks/dit_xl2_size.py                 # CPU: batch 1, 2, 4
    .venv/bin/python benchmarks/dit_xl2_size.py --device cuda --precision bf16 \
        --batch-sizes 1 32 64 128 256 --steps 50 --images-per-class 300   # GPU variant

Writes benchmarks/results/dit_xl2_size.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ImageNette's ten wnids (class folders of the synthetic set) and their ImageNet-1K labels
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
              "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888605": 701}


def build_model(path: Path) -> Path:
    """A DiT-XL/2-256 folder with random weights (transformer, SD VAE, DDIM scheduler config)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    vae = AutoencoderKL(  # the stabilityai/sd-vae-ft-ema config
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), sample_size=256, scaling_factor=0.18215)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                              beta_schedule="linear", clip_sample=False)
    id2label = {str(i): f"class {i}" for i in range(1000)}
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = id2label
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def build_data(root: Path, per_class: int) -> Path:
    """10 wnid class folders of smooth random 320×256 JPEGs (ImageNette's shape after resize)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for wnid in IMAGENETTE:
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            small = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            Image.fromarray(small).resize((320, 256), Image.BICUBIC).save(d / f"{k}.JPEG", quality=90)
    (root / "class_map.json").write_text(json.dumps(IMAGENETTE))
    return root


def child(args) -> None:
    """One `mgd3 distill` in this process, with the denoiser and VAE timed; prints a JSON line."""
    import torch

    from mgd3.backends.dit import DiTBackend, KLVaeMixin
    from mgd3.cli import main

    times: dict[str, list] = {"step": [], "encode": [], "decode": []}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn, key):
        def wrapper(self, x, *a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(self, x, *a, **kw)
            sync()
            times[key].append((time.perf_counter() - t0, int(x.shape[0])))
            return out
        return wrapper

    DiTBackend.denoiser = timed(DiTBackend.denoiser, "step")
    KLVaeMixin.encode = timed(KLVaeMixin.encode, "encode")
    KLVaeMixin.decode = timed(KLVaeMixin.decode, "decode")
    b = args.batch
    argv = ["distill", "--data", str(args.data), "--class-map", str(args.data / "class_map.json"),
            "--classes", "n01440764", "--model", str(args.model), "--method", "mgd3", "--ipc", str(b),
            "--batch-size", str(b), "--encode-batch-size", str(b), "--steps", str(args.steps), "--cfg", "4",
            "--cfg-channels", "3", "--out", str(args.out), "--overwrite", "--quiet", "--device", args.device,
            "--precision", args.precision, "--cache-dir", str(args.out) + "-cache", "--max-real-per-class", str(b)]
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(json.dumps({"rc": rc, "batch": b, "wall_s": wall, "times": times,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "peak_cuda_gib": peak_gpu}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per run (the first is a warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--images-per-class", type=int, default=None, help="default: the largest batch size")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dit_xl2_size.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="LOG", help="only write the table from the JSON lines of an earlier "
                                                    "run's output (a run stopped before its last batch size)")
    args = ap.parse_args()
    if args.child:
        args.out = Path(args.out)
        child(args)
        return

    rows: list[dict] = []
    if args.render:  # the table from the JSON lines an earlier run printed
        for line in Path(args.render).read_text().splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
        write_table(args, rows, build_s=None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mgd3-xl2-"))
    t0 = time.perf_counter()
    model = build_model(tmp / "DiT-XL-2-256")
    build_s = time.perf_counter() - t0
    data = build_data(tmp / "imagenette-synthetic", args.images_per_class or max(args.batch_sizes))
    for b in args.batch_sizes:
        cmd = [sys.executable, __file__, "--child", "--batch", str(b), "--steps", str(args.steps),
               "--device", args.device, "--precision", args.precision, "--model", str(model),
               "--data", str(data), "--out", str(tmp / f"out-b{b}")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MGD3_CACHE_DIR=str(tmp / "c")))
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            rows.append({"batch": b, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        steps = res["times"]["step"]
        warm = steps[1:] or steps  # the first forward pays one-time costs
        per_step = sum(t for t, _ in warm) / len(warm)
        enc = res["times"]["encode"]
        dec = res["times"]["decode"]
        res.update(per_step_s=per_step, per_image_step_s=per_step / b,
                   encode_per_image_s=sum(t for t, _ in enc) / max(1, sum(n for _, n in enc)),
                   decode_per_image_s=sum(t for t, _ in dec) / max(1, sum(n for _, n in dec)),
                   forward_batch=steps[0][1] if steps else None)
        res.pop("times")
        rows.append(res)
        print(json.dumps(res), flush=True)
        write_table(args, rows, build_s)  # after every run: a long benchmark stopped early keeps its rows


def write_table(args, rows: list[dict], build_s: float | None) -> None:
    import torch

    from mgd3.machine import cpu_name

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# `mgd3 distill` at DiT-XL/2 size",
        "",
        "A randomly initialised DiT-XL/2 (`DiTTransformer2DModel`, 28 layers, 16 heads × 72, patch 2, "
        "4 → 8 channels, 1000 classes, 32×32×4 latents; 750 M parameters: diffusers keeps a label and "
        "timestep embedder in every block, the original DiT-XL/2 has 675 M) and an "
        "`AutoencoderKL` with the SD VAE config (84 M), saved as a `facebook/DiT-XL-2-256` folder, run through "
        "the real CLI: `mgd3 distill --method mgd3 --cfg 4 --cfg-channels 3` on one class of a synthetic "
        "ImageNette-shaped folder (320×256 JPEGs, centre-cropped to 256 px), IPC = batch size, one batch, "
        f"{args.steps} sampling steps. Speed and memory do not depend on the weights.",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}; "
        f"torch {torch.__version__}; device {args.device}, precision {args.precision}; 1-minute load average "
        f"when the table was written: {load:.0f}",
        f"- command: `nice -n 10 .venv/bin/python benchmarks/dit_xl2_size.py --batch-sizes "
        f"{' '.join(map(str, args.batch_sizes))} --steps {args.steps} --device {args.device} "
        f"--precision {args.precision}`",
        "- step = one call of the backend's denoiser: the transformer on the CFG-doubled batch "
        "(2 × batch); the first step of each run is a warm-up and is left out when more than one ran",
        "- peak memory = the peak resident set (RSS) of the process running the whole command "
        "(model load, encoding, sampling, decoding, writing)",
    ]
    if build_s is not None:
        lines.append(f"- building and saving the random model took {build_s:.0f} s (not part of the runs)")
    lines += [
        "",
        "| batch | forward batch (CFG) | s / step | s / image-step | VAE encode s / image | "
        "VAE decode s / image | whole command s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['forward_batch']} | {r['per_step_s']:.1f} | {r['per_image_step_s']:.1f} | "
                     f"{r['encode_per_image_s']:.1f} | {r['decode_per_image_s']:.1f} | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_gib']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
