"""Speed of the `mgd3 evaluate` training loop vs a plain hand-written PyTorch loop.

Same network (ConvNet-3, instance norm, 28x28x1), same data (IPC random real Fashion-MNIST
images), same batch size (256), SGD with momentum, no augmentation (the `dc` protocol). The
plain loop keeps pre-normalised float tensors and does nothing but randperm / index /
forward / backward / step; mgd3 normalises uint8 batches on the fly and runs its full loop
(schedule, seeded generators, bookkeeping). Also shown: the DC code's way (TensorDataset +
DataLoader(shuffle=True)), bf16 autocast and torch.compile. Runs are interleaved A/B and
the median is reported, because the machine is shared.

    nice -n 10 .venv/bin/python benchmarks/eval_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mgd3.io.data import load_data
from mgd3.evaluation.networks import build_network
from mgd3.evaluation.protocols import get_protocol, resolve
from mgd3.evaluation.references import random_real_indices
from mgd3.evaluation.train import RunOptions, dataset_normalization, tensor_set, train_and_test
from mgd3.machine import cpu_name


def plain_loop(x: torch.Tensor, y: torch.Tensor, passes: int, seed: int, batch: int = 256) -> float:
    """images/s of a minimal loop on pre-normalised float tensors."""
    torch.manual_seed(seed)
    net = build_network("convnet-3", 1, 10, 28)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    n = len(y)
    t0 = time.perf_counter()
    for _ in range(passes):
        perm = torch.randperm(n)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return passes * n / (time.perf_counter() - t0)


def dataloader_loop(x: torch.Tensor, y: torch.Tensor, passes: int, seed: int, batch: int = 256) -> float:
    """images/s of the DC code's way: TensorDataset + DataLoader(shuffle=True), one per run."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    net = build_network("convnet-3", 1, 10, 28)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, num_workers=0)
    t0 = time.perf_counter()
    for _ in range(passes):
        for xb, yb in loader:
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return passes * len(y) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipc", type=int, default=100, help="images per class (10 classes)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extras", nargs="*", default=["dataloader", "bf16", "compile"],
                    choices=["dataloader", "bf16", "compile"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train_data = load_data("fashion-mnist", "train")
    idx = random_real_indices(train_data.targets, 10, a.ipc, 0)
    train = tensor_set(train_data.dataset(idx))
    test = tensor_set(load_data("fashion-mnist", "test").dataset(np.arange(500)))
    norm = dataset_normalization(train)
    x = (train.images.float() / 255.0 - norm.mean[0]) / norm.std[0]  # pre-normalised, for the plain loop
    y = train.targets
    p = resolve(get_protocol("dc"), ipc=a.ipc, num_classes=10, n_images=len(y), set_resolution=28,
                data_name="fashion-mnist", epochs=a.epochs)
    p = dataclasses.replace(p, dc_extra_epoch=False)  # exactly `epochs` passes, like the plain loop
    opts = RunOptions(device="cpu", progress=False)

    def ours(seed: int, **kw) -> float:
        return train_and_test(p, train, test, seed=seed, num_classes=10, norm=norm,
                              opts=dataclasses.replace(opts, **kw))["images_per_s"]

    res: dict[str, list[float]] = {"plain": [], "mgd3": []}
    for r in range(a.repeats):  # interleaved, so load changes hit both alike
        res["plain"].append(plain_loop(x, y, a.epochs, r))
        res["mgd3"].append(ours(r))
        print(f"repeat {r}: plain {res['plain'][-1]:.0f} img/s, mgd3 {res['mgd3'][-1]:.0f} img/s", file=sys.stderr)
    extra: dict[str, float] = {}
    if "dataloader" in a.extras:
        extra["DC-code style TensorDataset + DataLoader"] = dataloader_loop(x, y, a.epochs, 0)
    if "bf16" in a.extras:
        extra["mgd3 --bf16 (autocast)"] = ours(0, bf16=True)
    if "compile" in a.extras:
        extra["mgd3 --compile (incl. compilation)"] = ours(0, compile=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    ratio = med["mgd3"] / med["plain"]
    ratios = [m / q for m, q in zip(res["mgd3"], res["plain"])]
    lines = [
        "# evaluation speed: mgd3's training loop vs a plain PyTorch loop",
        "",
        f"Command: `nice -n 10 .venv/bin/python benchmarks/eval_speed.py {' '.join(sys.argv[1:])}`",
        f"Machine: {cpu_name()} (2 cores, shared with other jobs), "
        f"{a.threads} torch thread(s), torch {torch.__version__} on CPU, Python {platform.python_version()}; "
        f"measured {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        f"Work: ConvNet-3 (instance norm) on {len(y)} random real Fashion-MNIST images (IPC {a.ipc}), "
        f"28x28x1, batch 256, SGD momentum 0.9, {a.epochs} epochs per run, no augmentation (`dc`); "
        "training time only (mgd3's one test evaluation at the end is excluded, as its `train_seconds`).",
        "",
        "| loop | images/s (median) | runs |",
        "|---|---|---|",
        f"| plain hand-written loop (pre-normalised float tensors) | {med['plain']:.0f} | "
        f"{', '.join(f'{v:.0f}' for v in res['plain'])} |",
        f"| mgd3 `train_and_test` (uint8 in memory, normalised per batch) | {med['mgd3']:.0f} | "
        f"{', '.join(f'{v:.0f}' for v in res['mgd3'])} |",
    ]
    lines += [f"| {k} | {v:.0f} | 1 |" for k, v in extra.items()]
    lines += ["", f"**mgd3 / plain = {ratio:.3f}** (median of each; per interleaved pair: "
              f"{', '.join(f'{v:.3f}' for v in ratios)}); goal >= 0.95.", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
