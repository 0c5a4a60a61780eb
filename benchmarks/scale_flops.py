"""Benchmark: forward FLOPs of the ImageNet-scale models, measured CPU throughput, and the
H100 estimates of docs/SCALE.md derived from them.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add;
matmuls, convolutions and attention; norms and activations are not counted) on models built
on the `meta` device from their published configs — shapes only, no weights, no memory:
  * DiT-XL/2 256 px (diffusers DiTTransformer2DModel, facebook/DiT-XL-2-256 config),
  * the SD VAE (AutoencoderKL, SD v1.5 / sd-vae-ft config) encode and decode at 256 and 512 px,
  * the SD v1.5 UNet (UNet2DConditionModel) at 512 px (64x64 latents, 77 text tokens),
  * the Fashion-MNIST model mgd3 ships (src/mgd3/models/fashion-mnist).
Measured on this CPU, single thread: the shipped model's forward (achieved FLOP/s), one
DiT-XL/2 forward at batch 2 with random weights (--skip-large to leave it out), JPEG decoding
of ImageNet-sized photos with mgd3's preprocessing, and scikit-learn k-means on one class of
ImageNet-sized latents. Writes benchmarks/results/scale_flops.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_flops.py [--reps 3] [--skip-large]
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
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mgd3.machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "mgd3" / "models" / "fashion-mnist"

H100_BF16_PEAK = 989e12  # H100 SXM dense bf16 tensor-core peak, FLOP/s
UTILISATION = (0.30, 0.50)  # assumed sustained fraction of peak for the estimates
STEPS = 50
IMAGENET_TRAIN = {"ImageNet-100": (100, 126_689), "ImageNet-1K": (1000, 1_281_167)}
SCENARIOS = [("ImageNet-100", 10), ("ImageNet-1K", 50)]
KMEANS_ITERS = (10, 40)  # assumed Lloyd iterations per class (range)


# --------------------------------------------------------------------------- models (meta)


def dit_xl2(device="meta"):
    from diffusers import DiTTransformer2DModel

    with torch.device(device):
        return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                     num_layers=28, patch_size=2, sample_size=32, num_embeds_ada_norm=1000).eval()


def sd_vae(device="meta"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                             layers_per_block=2, latent_channels=4, sample_size=256).eval()


def sd15_unet(device="meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8).eval()


def count(fn) -> tuple[float, dict]:
    """Total FLOPs of fn() and FLOPs per aten op."""
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        fn()
    per_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    return float(fc.get_total_flops()), per_op


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- CPU timings


def timed_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(fn, reps: int) -> list[float]:
    """Wall seconds of `reps` calls after one warm-up call."""
    fn()
    return [timed_once(fn) for _ in range(reps)]


def jpeg_decode_rate(resolution: int, reps: int) -> tuple[float, list[str]]:
    """Images/s of one core reading an ImageNet-sized JPEG and preprocessing it as mgd3 does
    (PIL decode, RGB, bicubic resize of the shorter side, centre crop, [-1, 1])."""
    import sklearn

    from mgd3.io.sources import read_image, to_model_space

    files = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))

    def one():
        for f in files:
            to_model_space(read_image(f, 3), resolution, 3)

    runs = timed(one, reps)
    return len(files) / statistics.median(runs), [f"{f.name} ({f.stat().st_size // 1024} KiB)" for f in files]


def check_rate(reps: int) -> float:
    """Files/s of one core running the first-run check of an image folder (mgd3.io.folders._image_problem:
    PIL verify, no pixel decoding) on the same photos, from the page cache."""
    import sklearn

    from mgd3.io.folders import _image_problem

    files = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    runs = timed(lambda: [_image_problem(str(f)) for _ in range(50) for f in files], reps)
    return 50 * len(files) / statistics.median(runs)


def png_write_rate(reps: int) -> float:
    """Images/s of one core writing a 256 px RGB photo crop as PNG the way mgd3's store does."""
    import sklearn

    from mgd3.io.sources import read_image, to_model_space
    from mgd3.io.store import save_png, to_pixels

    f = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))[0]
    arr = to_pixels(to_model_space(read_image(f, 3), 256, 3)[None])[0]  # (256, 256, 3)
    with tempfile.TemporaryDirectory() as d:
        runs = timed(lambda: [save_png(arr, Path(d) / f"{i}.png") for i in range(10)], reps)
    return 10 / statistics.median(runs)


def kmeans_cost(n: int, d: int, k: int, seed: int = 0) -> tuple[float, float]:
    """One class, scikit-learn KMeans(k, random_state=0, n_init="auto") on n float32 latents of d
    dims: (seconds of k-means++ init + 1 iteration, seconds per further Lloyd iteration). Synthetic
    data without clear clusters (an 8-dimensional continuum embedded in d dims, plus noise), so
    Lloyd iterations do not stop early; tol=0 and max_iter 1 vs 11. Real classes converge in their
    own number of iterations: the estimate takes a range."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    u = rng.random((n, 8))
    x = (u @ rng.standard_normal((8, d)) + 0.05 * rng.standard_normal((n, d))).astype(np.float32)
    t = []
    for iters in (1, 11):
        t0 = time.perf_counter()
        km = KMeans(n_clusters=k, random_state=0, n_init="auto", max_iter=iters, tol=0.0).fit(x)
        t.append(time.perf_counter() - t0)
        assert km.n_iter_ == iters, "k-means stopped early: the per-iteration time would be wrong"
    return t[0], max(0.0, (t[1] - t[0]) / 10)


# --------------------------------------------------------------------------- estimates


def hours(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def span(flops: float) -> str:
    lo, hi = (flops / (H100_BF16_PEAK * u) for u in reversed(UTILISATION))
    return f"{hours(lo)} – {hours(hi)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="do not time DiT-XL/2 on the CPU")
    ap.add_argument("--workers", type=int, default=15,
                    help="DataLoader workers assumed for the JPEG rows (mgd3's default on a 16-core GPU machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_flops.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    # --- FLOPs per image
    F: dict[str, float] = {}
    ops: dict[str, dict] = {}
    n_params: dict[str, int] = {}
    dit = dit_xl2()
    n_params["DiT-XL/2"] = params(dit)
    x, lab = torch.zeros(2, 4, 32, 32, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    total, ops["DiT-XL/2"] = count(lambda: dit(x, timestep=lab, class_labels=lab))
    F["DiT-XL/2 forward, 256 px"] = total / 2
    vae = sd_vae()
    n_params["SD VAE"] = params(vae)
    for r in (256, 512):
        img = torch.zeros(2, 3, r, r, device="meta")
        z = torch.zeros(2, 4, r // 8, r // 8, device="meta")
        F[f"SD VAE encode, {r} px"] = count(lambda: vae.encode(img).latent_dist.mean)[0] / 2
        F[f"SD VAE decode, {r} px"] = count(lambda: vae.decode(z).sample)[0] / 2
    unet = sd15_unet()
    n_params["SD v1.5 UNet"] = params(unet)
    zu, tu = torch.zeros(2, 4, 64, 64, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    text = torch.zeros(2, 77, 768, device="meta")
    total, ops["SD v1.5 UNet"] = count(lambda: unet(zu, tu, encoder_hidden_states=text).sample)
    F["SD v1.5 UNet forward, 512 px"] = total / 2
    del dit, vae, unet

    from mgd3.backends import load_backend

    b = load_backend(SHIPPED)
    batch = 200  # IPC 10 × 10 classes, doubled for CFG: one sampling step's network pass
    xs = torch.randn(batch, *b.latent_shape)
    ts = torch.full((batch,), 500, dtype=torch.long)
    ys = torch.arange(batch) % b.num_classes
    n_params["shipped (transformer)"] = params(b.transformer)
    f_ship, ops["shipped"] = count(lambda: b.transformer(xs, timestep=ts, class_labels=ys))
    F["shipped Fashion-MNIST forward, 28 px"] = f_ship / batch
    imgs = torch.zeros(batch, b.image_channels, b.resolution, b.resolution)
    F["shipped VAE encode, 28 px"] = count(lambda: b.vae.encode(imgs).latent_dist.mean)[0] / batch

    # --- CPU timings, one thread; the two networks alternate so that load from other processes
    # falls on both alike
    wall0, cpu0 = time.perf_counter(), time.process_time()
    big = None
    if not args.skip_large:
        torch.manual_seed(0)
        big = dit_xl2("meta").to_empty(device="cpu")
        with torch.no_grad():
            for p in big.parameters():
                p.normal_(0.0, 0.02)
        xb = torch.randn(2, 4, 32, 32)
        tb, yb = torch.tensor([500, 500]), torch.tensor([1, 2])
    ship_runs, big_runs = [], []
    with torch.no_grad():
        run_ship = lambda: b.transformer(xs, timestep=ts, class_labels=ys)  # noqa: E731
        run_big = (lambda: big(xb, timestep=tb, class_labels=yb)) if big is not None else None  # noqa: E731
        for fn in (run_ship, run_big):  # warm-up
            if fn:
                fn()
        for _ in range(args.reps):
            ship_runs.append(timed_once(run_ship))
            if run_big:
                big_runs.append(timed_once(run_big))
    ship_rate = f_ship / statistics.median(ship_runs)
    large = (big_runs, 2 * F["DiT-XL/2 forward, 256 px"] / statistics.median(big_runs)) if big_runs else None
    del big
    jpeg_rate, jpeg_files = jpeg_decode_rate(256, max(3, args.reps))
    png_rate = png_write_rate(max(3, args.reps))
    check = check_rate(max(3, args.reps))
    km = {k: kmeans_cost(1300, 4 * 32 * 32, k) for k in (10, 50)}
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    km_s = {k: (a + (KMEANS_ITERS[0] - 1) * it, a + (KMEANS_ITERS[1] - 1) * it) for k, (a, it) in km.items()}

    # --- estimates
    f_dit, f_enc, f_dec = F["DiT-XL/2 forward, 256 px"], F["SD VAE encode, 256 px"], F["SD VAE decode, 256 px"]
    f_unet, f_enc5, f_dec5 = (F["SD v1.5 UNet forward, 512 px"], F["SD VAE encode, 512 px"],
                              F["SD VAE decode, 512 px"])
    rows = []
    for name, ipc in SCENARIOS:
        classes, train = IMAGENET_TRAIN[name]
        n = classes * ipc
        for model, fwd, enc, dec in (("DiT-XL/2 256", f_dit, f_enc, f_dec), ("SD v1.5 512", f_unet, f_enc5, f_dec5)):
            gen = n * STEPS * 2 * fwd
            rows.append((f"{name} IPC {ipc}", model, n, gen, n * dec, train * enc, train))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_flops.py " + " ".join(sys.argv[1:])
    L = [
        "# Forward FLOPs at ImageNet scale, CPU throughput, and H100 estimates",
        "",
        f"Command: `{cmd.strip()}`",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (shared with another benchmark), 1 torch thread, "
        f"torch {torch.__version__}, Python {platform.python_version()}; measured {now}.",
        "FLOPs: `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add; matmul, convolution, "
        "attention; norms and activations not counted), models built on the `meta` device from their "
        "published configs.",
        "",
        "## FLOPs per image (one forward pass)",
        "",
        "| network | GFLOP / image | params |",
        "|---|---|---|",
    ]
    pname = {"DiT": "DiT-XL/2", "SD VAE": "SD VAE", "SD v1.5": "SD v1.5 UNet",
             "shipped Fashion": "shipped (transformer)"}
    for k, v in F.items():
        p = next((n_params[pv] for pk, pv in pname.items() if k.startswith(pk)), None)
        L.append(f"| {k} | {v / 1e9:,.2f} | {f'{p / 1e6:,.1f} M' if p else ''} |")
    L += ["",
          *(f"{name} by op (batch 2, GFLOP): " + ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in ops[name].items())
            for name in ("DiT-XL/2", "SD v1.5 UNet")),
          "The DiT-XL/2 paper counts 118.6 GFLOPs (multiply-adds) per forward: the same model, half this "
          "table's 2-FLOPs-per-MAC figure. diffusers' DiT has one label/timestep embedder per block, hence "
          f"{n_params['DiT-XL/2'] / 1e6:.0f} M parameters rather than the original 675 M (negligible FLOPs).",
          "",
          "## Measured on this CPU (1 thread)",
          "",
          "| measure | value |",
          "|---|---|",
          f"| shipped model forward, batch {batch} ({f_ship / 1e9:.1f} GFLOP), median of {args.reps} | "
          f"{statistics.median(ship_runs):.3f} s → **{ship_rate / 1e9:.1f} GFLOP/s** |"]
    if large:
        runs, rate = large
        L.append(f"| DiT-XL/2 forward, batch 2 ({2 * f_dit / 1e9:.0f} GFLOP), random weights, fp32, median of "
                 f"{len(runs)} | {statistics.median(runs):.2f} s → **{rate / 1e9:.1f} GFLOP/s** |")
        L.append(f"| DiT-XL/2 / shipped achieved FLOP/s | {rate / ship_rate:.2f} |")
    L += [f"| JPEG decode + resize + crop to 256 px, per core | {jpeg_rate:.0f} images/s "
          f"({', '.join(jpeg_files)}) |",
          f"| first-run check of an image file (PIL verify, page cache), per core | {check:,.0f} files/s |",
          f"| PNG write of a 256 px RGB image (mgd3.io.store.save_png), per core | {png_rate:.0f} images/s |",
          *(f"| k-means, one class of 1300 latents × 4096 dims, k = {k}: init + 1 iteration; each further "
            f"iteration | {a:.2f} s; {it:.3f} s |" for k, (a, it) in km.items()),
          "",
          f"k-means estimates assume {KMEANS_ITERS[0]}–{KMEANS_ITERS[1]} Lloyd iterations per class (real VAE "
          "latents of the shipped Fashion-MNIST model, 1000 per class, converge in 10–29 iterations at k = 10 "
          "and 10–14 at k = 50); the timed data is synthetic, with a fixed iteration count.",
          "",
          f"## H100 estimates (bf16, peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s dense, "
          f"{UTILISATION[0]:.0%}–{UTILISATION[1]:.0%} sustained)",
          "",
          f"Generation = images × {STEPS} steps × 2 (CFG) × forward FLOPs; decode = images × VAE decode; "
          "encode = the whole train split × VAE encode (no --max-real-per-class). Estimates, not measurements.",
          "",
          "| run | model | images | generation PFLOP | time | decode PFLOP | time | encode train split | PFLOP | time |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for run, model, n, gen, dec, enc, train in rows:
        L.append(f"| {run} | {model} | {n:,} | {gen / 1e15:,.1f} | {span(gen)} | {dec / 1e15:,.2f} | {span(dec)} | "
                 f"{train:,} images | {enc / 1e15:,.1f} | {span(enc)} |")
    L += ["",
          f"JPEG decoding of the train split with {args.workers} DataLoader workers at the measured "
          f"{jpeg_rate:.0f} images/s per core: "
          + "; ".join(f"{name} {hours(train / (args.workers * jpeg_rate))}"
                      for name, (_, train) in IMAGENET_TRAIN.items()) + ".",
          "First-run file check of the train split (once per file listing, cached; one core): "
          + "; ".join(f"{name} {hours(train / check)}" for name, (_, train) in IMAGENET_TRAIN.items())
          + " from the page cache, more when the disk is slower than the check.",
          "PNG writes of the distilled set, one core: " + "; ".join(
              f"{name} IPC {ipc} {hours(IMAGENET_TRAIN[name][0] * ipc / png_rate)}" for name, ipc in SCENARIOS) + ".",
          f"k-means of every class, one core: ImageNet-100 (k = 10) {hours(100 * km_s[10][0])} – "
          f"{hours(100 * km_s[10][1])}, ImageNet-1K (k = 50) {hours(1000 * km_s[50][0])} – "
          f"{hours(1000 * km_s[50][1])}; scikit-learn runs it on every core of the process (OpenMP).",
          ]
    step = 64 * 2 * f_dit  # one sampling step at --batch-size 64 with CFG
    L += ["",
          "Context, not re-measured here: benchmarks/results/distill_speed_h100.md ran a 1.43 M-parameter DiT "
          "(4 layers) on the lent H100 at batch 100 with CFG: 50 steps in 0.39 s, 7.8 ms per step, far below "
          "any FLOP limit — the per-step floor of kernel launches and Python. One DiT-XL/2 step at "
          f"--batch-size 64 is {step / 1e12:.0f} TFLOP, {span(step)} at the assumed "
          "utilisation, so at batch sizes of 64 and more the model's FLOPs, not that floor, set the time. "
          "benchmarks/results/methods_ipc10.md: model load and CUDA start-up took 15–19 s per process.",
          f"On this CPU, time follows the FLOP count across a {f_dit / (f_ship / batch):.0f}× "
          "range of per-image cost to within the ratio above: DiT-XL/2's wide matmuls (1152) run at the same "
          "or a higher rate than the shipped model's narrow ones (192), so FLOPs / (peak × utilisation) does "
          "not flatter the large model; the utilisation range carries the uncertainty.",
          f"The CPU was shared with another benchmark while this ran (this process got {cpu_share:.0%} of a core "
          "during the timings), so the per-core rates are lower bounds for a dedicated core; a rerun moved "
          "them by up to 2×."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
