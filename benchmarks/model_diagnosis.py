"""Benchmark: what limits a Fashion-MNIST model (default: the shipped one), by measurement.

Three parts, each a section of the results file (run them one at a time with --part):

vae     The VAE ceiling. Random real subsets (the rule of `mgd3 evaluate --reference random-real`:
        subset seed s picks IPC images per class) scored under `dc` as they are and after a round
        trip through the model's VAE (encode to the latent mean, decode, back to uint8). A DiT that
        sampled real images' latents exactly would score the second number at best.
spread  How the DiT's samples spread against the data, as the sampler's steps and CFG change, and
        what mode guidance does to it. Each row is one set of 50 images per class (`mgd3 distill`
        through the Python API, generation seed 0 or --gen-seed) measured in the feature space of a
        ConvNet-3 trained on 10 000 real train images (its flattened conv features, 2048 values):
        k-NN precision and recall (Kynkäänniemi et al., NeurIPS 2019; k = 3) and coverage (Naeem
        et al., ICML 2020), per class against 50 random real images of the class (subset seed 100),
        averaged over classes. A second random real subset is the row to compare with: what a set
        that truly comes from the data scores. --score adds each set's `dc` accuracy (the IPC 50
        cell; for plain samples this is the classification accuracy score, CAS).
loss    The model's ε-prediction loss on the encoded test split (2000 images, fixed noise and
        timesteps): the number to compare between checkpoints of a training run (--model A B ...).

    python benchmarks/model_diagnosis.py --part vae --ipc 10 50 --subset-seeds 0 1 2
    python benchmarks/model_diagnosis.py --part spread --settings plain:50:1.5 plain:100:1.5 mgd3:50:1.5 --score
    python benchmarks/model_diagnosis.py --part loss --model MODEL_A MODEL_B

A setting is method:steps:cfg[:lambda][:iLOW_HIGH], method one of plain, mgd3, real (a random real
subset; steps and CFG ignored); iLOW_HIGH samples with --cfg-interval LOW HIGH (e.g. i0.45_1.23). Appends to benchmarks/results/model_diagnosis.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mgd3
from mgd3.api import load_model, load_set
from mgd3.io.data import load_data
from mgd3.evaluation.protocols import PROTOCOLS, resolve
from mgd3.evaluation.references import random_real_indices
from mgd3.evaluation.train import RunOptions, TensorSet, dataset_normalization, tensor_set, train_and_test
from mgd3.machine import cpu_name
from mgd3.train.quality import psnr

sys.path.insert(0, str(Path(__file__).parent))
from results_file import append_section  # noqa: E402

DATA = "fashion-mnist"
NUM_CLASSES = 10


def dc_score(train: TensorSet, test: TensorSet, norm, seed: int = 0) -> float:
    """Test accuracy (%) of ConvNet-3 trained on `train` under `dc` (the grid's protocol)."""
    ipc = len(train) // NUM_CLASSES
    p = resolve(PROTOCOLS.get("dc"), ipc=ipc, num_classes=NUM_CLASSES, n_images=len(train), set_resolution=28,
                data_name=DATA)
    return float(train_and_test(p, train, test, seed=seed, num_classes=NUM_CLASSES, norm=norm,
                                opts=RunOptions(device="cpu"))["final_acc"])


def round_trip(backend, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> VAE encode (latent mean) -> decode -> uint8."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 500):
            x = images[i:i + 500].float() / 127.5 - 1.0
            out.append(backend.decode(backend.encode(x)).cpu())
    rec = torch.cat(out)
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def part_vae(args, backend, train, test, norm) -> list[str]:
    lines = ["| IPC | subset seed | real as is | after the VAE round trip | difference | PSNR of the round trip |",
             "|---|---|---|---|---|---|"]
    diffs: dict[int, list[float]] = {}
    for ipc in args.ipc:
        for s in args.subset_seeds:
            idx = torch.from_numpy(random_real_indices(train.targets.numpy(), NUM_CLASSES, ipc, s))
            real = TensorSet(train.images[idx], train.targets[idx])
            rec = TensorSet(round_trip(backend, real.images), real.targets)
            known = args.known_as_is.get((ipc, s))
            a = known if known is not None else dc_score(real, test, norm)
            b = dc_score(rec, test, norm)
            db = psnr(rec.images.float() / 127.5 - 1, real.images.float() / 127.5 - 1)
            diffs.setdefault(ipc, []).append(b - a)
            mark = "†" if known is not None else ""
            lines.append(f"| {ipc} | {s} | {a:.2f}{mark} | {b:.2f} | {b - a:+.2f} | {db:.2f} dB |")
            print(lines[-1], flush=True)
    lines.append("")
    if args.known_as_is:
        lines += ["† Not re-run: the real subset's score as is, from an earlier run of this part (the same subset, "
                  "protocol and evaluation seed; --known-as-is).", ""]
    lines += [f"Mean difference at IPC {ipc}: **{np.mean(d):+.2f}** points (n = {len(d)})." for ipc, d in diffs.items()]
    return lines


def feature_net(train: TensorSet, test: TensorSet, norm, epochs: int, images: int):
    """ConvNet-3 on `images` random real train images (the DC optimiser); returns (features fn, test acc)."""
    idx = torch.from_numpy(random_real_indices(train.targets.numpy(), NUM_CLASSES, images // NUM_CLASSES, 7))
    train = TensorSet(train.images[idx], train.targets[idx])
    p = resolve(PROTOCOLS.get("dc"), ipc=images // NUM_CLASSES, num_classes=NUM_CLASSES, n_images=len(train),
                set_resolution=28, data_name=DATA, epochs=epochs)
    r = train_and_test(p, train, test, seed=0, num_classes=NUM_CLASSES, norm=norm, opts=RunOptions(device="cpu"),
                       return_model=True)
    net = r["model"].eval()
    mean = torch.tensor(norm.mean).view(1, -1, 1, 1)
    std = torch.tensor(norm.std).view(1, -1, 1, 1)

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([net.features((images[i:i + 1000].float() / 255 - mean) / std).flatten(1)
                              for i in range(0, len(images), 1000)])

    return features, r["final_acc"]


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)  # (n, n); the k-th neighbour other than the point itself
    return d.kthvalue(k + 1, dim=1).values


def spread(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float, float]:
    """(precision, recall, coverage) of `fake` against `real` (feature rows)."""
    rr, rf = knn_radii(real, k), knn_radii(fake, k)
    d = torch.cdist(fake, real)  # (m, n)
    precision = (d <= rr[None, :]).any(dim=1).float().mean().item()
    recall = (d <= rf[:, None]).any(dim=0).float().mean().item()
    coverage = (d <= rr[None, :]).any(dim=0).float().mean().item()
    return precision, recall, coverage


def make_set(args, backend, setting: str, train: TensorSet, work: Path) -> TensorSet:
    parts = setting.split(":")
    interval = [p for p in parts if p.startswith("i")]  # iLOW_HIGH: --cfg-interval LOW HIGH
    parts = [p for p in parts if not p.startswith("i")]
    method = parts[0]
    if method == "real":
        idx = torch.from_numpy(random_real_indices(train.targets.numpy(), NUM_CLASSES, args.per_class, 1))
        return TensorSet(train.images[idx], train.targets[idx])
    steps, cfg = int(parts[1]), float(parts[2])
    kw = dict(ipc=args.per_class, steps=steps, cfg=cfg, seed=args.gen_seed, model=backend, overwrite=True,
              progress=False, max_real_per_class=1000, batch_size=50)  # as benchmarks/fmnist_table.py
    if method == "mgd3":
        kw["lambda"] = float(parts[3]) if len(parts) > 3 else 0.1
    if interval:
        kw["cfg_interval"] = tuple(float(v) for v in interval[0][1:].split("_"))
    folder = work / f"{Path(args.model[0]).name}-{setting.replace(':', '_')}"
    if args.gen_seed:  # seed 0 keeps its folder name, so earlier work folders are reused
        folder = folder.with_name(f"{folder.name}-s{args.gen_seed}")
    if not (folder / "manifest.json").is_file():  # --work keeps the sets: a second run scores them
        mgd3.distill(DATA, folder, method=method, **kw)
    got = load_set(folder)
    return TensorSet(got.images, got.labels)


def part_spread(args, backend, train, test, norm) -> list[str]:
    t = time.perf_counter()
    features, acc = feature_net(train, test, norm, args.feature_epochs, args.feature_images)
    print(f"feature network: {acc:.2f} % on the test split ({time.perf_counter() - t:.0f} s)", flush=True)
    ref_idx = torch.from_numpy(random_real_indices(train.targets.numpy(), NUM_CLASSES, args.per_class, 100))
    ref_f, ref_y = features(train.images[ref_idx]), train.targets[ref_idx]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mgd3-diagnosis-"))
    lines = [f"Feature network: ConvNet-3, {args.feature_epochs} epochs on {args.feature_images} random real train "
             "images (subset seed 7), "
             f"{acc:.2f} % on the test split. Reference: {args.per_class} random real images per class "
             "(subset seed 100). Per-class values averaged over the 10 classes.", "",
             "| set (method, DDPM steps, CFG, λ, CFG interval) | precision | recall | coverage | `dc` accuracy | sampling s |",
             "|---|---|---|---|---|---|"]
    for setting in args.settings:
        t = time.perf_counter()
        s = make_set(args, backend, setting, train, work)
        secs = time.perf_counter() - t
        f = features(s.images)
        vals = np.array([spread(ref_f[ref_y == c], f[s.targets == c]) for c in range(NUM_CLASSES)]).mean(0)
        score = f"{dc_score(s, test, norm):.2f}" if args.score else "–"
        name = "random real (subset seed 1)" if setting.startswith("real") else setting
        lines.append(f"| {name} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[2]:.3f} | {score} | "
                     f"{secs:.0f} |")
        print(lines[-1], flush=True)
    return lines


def part_loss(args, train, test) -> list[str]:
    from mgd3.train.dit_stage import eval_loss

    lines = ["| model | held-out ε-loss (2000 test images) | VAE round-trip PSNR (test) |", "|---|---|---|"]
    for model in args.model:
        b = load_model(model)
        x = test.images[:2000].float() / 127.5 - 1.0
        with torch.inference_mode():
            lat = torch.cat([b.encode(x[i:i + 500]) for i in range(0, len(x), 500)])
        loss = eval_loss(b.transformer, lat, test.targets[:2000], torch.device("cpu"))
        rec = round_trip(b, test.images[:2000])
        db = psnr(rec.float() / 127.5 - 1, x)
        lines.append(f"| `{model}` | {loss:.5f} | {db:.2f} dB |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["vae", "spread", "loss"], required=True)
    ap.add_argument("--model", nargs="+", default=["fashion-mnist"], help="model folder(s); loss takes several")
    ap.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--subset-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["real", "plain:50:1.5", "mgd3:50:1.5"])
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--gen-seed", type=int, default=0, help="generation seed of the spread part's sets")
    ap.add_argument("--feature-epochs", type=int, default=3)
    ap.add_argument("--feature-images", type=int, default=10000)
    ap.add_argument("--score", action="store_true", help="also each set's dc accuracy (slow: ~5 min a set)")
    ap.add_argument("--work", help="keep the generated sets here (and reuse them in a later run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--known-as-is", nargs="+", default=[], metavar="IPC:SEED:ACC",
                    help="vae part: reuse these real subsets' scores as they are (from an earlier run of this part) "
                         "instead of training on them again; only the round trip is scored")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_diagnosis.md"))
    args = ap.parse_args()
    try:
        args.known_as_is = {(int(i), int(s)): float(a) for i, s, a in (k.split(":") for k in args.known_as_is)}
    except ValueError:
        ap.error("--known-as-is takes IPC:SEED:ACC, e.g. 50:0:83.02")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    kw = dict(resolution=28, channels=1)
    train = tensor_set(load_data(DATA, "train", **kw).dataset(), batch_size=1000)
    test = tensor_set(load_data(DATA, "test", **kw).dataset(), batch_size=1000)
    norm = dataset_normalization(train)
    if args.part == "loss":
        body = part_loss(args, train, test)
    else:
        backend = load_model(args.model[0])
        body = (part_vae if args.part == "vae" else part_spread)(args, backend, train, test, norm)
    head = [
        f"## {args.part}: {args.model if args.part == 'loss' else args.model[0]}",
        "",
        f"Command: `python benchmarks/model_diagnosis.py {' '.join(sys.argv[1:])}`",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python "
        f"{platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{(time.perf_counter() - t0) / 60:.1f} min; load average {os.getloadavg()[0]:.1f}. `dc`: ConvNet-3, "
        "300 epochs, no augmentation, evaluation seed 0, normalised with the real train split's statistics.",
        "",
    ]
    append_section(args.out, "What limits the Fashion-MNIST model", head + body, args.note)


if __name__ == "__main__":
    main()
