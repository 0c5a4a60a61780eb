"""Stage: evaluation — the training loop that scores a set (train a fresh network, test it).

Images live in memory as uint8 tensors (N, C, R, R) on the training device; a batch is an
index into them (no DataLoader per step), normalised on the fly, augmented in batch
(`augment`), and the test split is scored in large batches under `torch.no_grad()`.
Randomness is explicit: the network's initial weights, the batch order and every
augmentation draw come from the run's seed. Optional bf16 autocast and `torch.compile`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mgd3.config import default_device
from mgd3.errors import Mgd3Error
from mgd3.files import to_uint8
from mgd3.evaluation import augment as A
from mgd3.evaluation.networks import build_network
from mgd3.evaluation.protocols import Protocol

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TensorSet:
    """Images (N, C, R, R) uint8 and class indices (N,) int64, kept in memory."""

    images: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device) -> "TensorSet":
        return TensorSet(self.images.to(device), self.targets.to(device))


def tensor_set(dataset, *, batch_size: int = 500, workers: int = 0, progress: bool = False,
               desc: str = "loading images") -> TensorSet:
    """A torch Dataset of (image float (C, R, R) in [-1, 1], class index) as a TensorSet."""
    from torch.utils.data import DataLoader

    n = len(dataset)
    if n == 0:
        raise Mgd3Error("no images to load")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    images, targets = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress or n <= batch_size, leave=False):
        images.append(to_uint8(x))
        targets.append(torch.as_tensor(y, dtype=torch.int64))
    return TensorSet(torch.cat(images), torch.cat(targets))


def center_crop(s: TensorSet, resolution: int) -> TensorSet:
    r = s.images.shape[-1]
    if r == resolution:
        return s
    top = (r - resolution) // 2
    return TensorSet(s.images[..., top:top + resolution, top:top + resolution].contiguous(), s.targets)


@dataclass(frozen=True)
class Normalization:
    """x_normalised = (x01 - mean) / std, per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def tensors(self, device) -> tuple[Tensor, Tensor]:
        m = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return m, s


def dataset_normalization(s: TensorSet, chunk: int = 4096) -> Normalization:
    """Per-channel mean / std of [0, 1] pixels (what the DC code hard-codes per data set)."""
    c = s.images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(0, len(s), chunk):
        x = s.images[i:i + chunk].to(torch.float64) / 255.0  # (b, C, R, R)
        total += x.sum((0, 2, 3))
        sq += (x * x).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (sq / count - mean * mean).clamp(min=1e-12).sqrt()
    return Normalization(tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std),
                         "real train split")


def imagenet_normalization(channels: int) -> Normalization:
    if channels == 3:
        return Normalization(IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    # one channel: the mean of the three (as a grayscale image repeated to RGB would see)
    return Normalization((round(sum(IMAGENET_MEAN) / 3, 4),), (round(sum(IMAGENET_STD) / 3, 4),), "imagenet (gray)")


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    bf16: bool = False
    compile: bool = False
    progress: bool = True
    eval_batch_size: int | None = None  # None: by resolution (about 256 MB of first-layer activations)


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(default_device())
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise Mgd3Error(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Mgd3Error(f"device {name} requested but CUDA is not available (use --device cpu)")
    return dev


def _eval_batch(resolution: int, opts: RunOptions) -> int:
    if opts.eval_batch_size:
        return opts.eval_batch_size
    return int(min(1024, max(16, 2 ** 26 // (128 * resolution * resolution))))


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def accuracy(model: nn.Module, test: TensorSet, norm: Normalization, *, device: torch.device,
             batch_size: int = 512, bf16: bool = False) -> float:
    """Top-1 accuracy (%) on `test` (uint8 images), in batches, under no_grad."""
    was_training = model.training
    model.eval()
    mean, std = norm.tensors(device)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(test), batch_size):
        x = test.images[i:i + batch_size].to(device, non_blocking=True).float() * scale + shift
        with _autocast(device, bf16):
            out = model(x)  # (b, classes)
        correct += (out.argmax(1) == test.targets[i:i + batch_size].to(device)).sum()
    model.train(was_training)
    return 100.0 * float(correct) / max(1, len(test))


def lr_factor(p: Protocol, epoch: int, total: int) -> float:
    """Multiplier of the base lr for (0-based) pass `epoch` of `total` passes."""
    e = p.epochs
    if p.schedule == "dc":
        # DC code: `for ep in range(Epoch+1): train; if ep == Epoch//2+1: lr *= 0.1`
        decay_after = e // 2 + 1 if p.dc_extra_epoch else e // 2 - 1
        return 0.1 if epoch > decay_after else 1.0
    if p.schedule == "multistep":  # torch MultiStepLR stepped per epoch
        stones = [math.floor(f * e + 1e-9) for f in p.milestones]
        return p.gamma ** sum(epoch >= s for s in stones)
    if p.schedule == "rded-cosine":  # RDED LambdaLR: half a cosine, ends at 0.5 x lr
        return 0.5 * (1.0 + math.cos(math.pi * epoch / e / 2)) if epoch <= e else 0.0
    if p.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / e))
    if p.schedule == "constant":
        return 1.0
    raise Mgd3Error(f"unknown lr schedule {p.schedule!r}; known: dc, multistep, rded-cosine, cosine, constant")


def _optimizer(p: Protocol, params, lr: float) -> torch.optim.Optimizer:
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=p.weight_decay)
    raise Mgd3Error(f"unknown optimizer {p.optimizer!r}; known: sgd, adamw")


def _should_eval(p: Protocol, k: int, total: int) -> bool:
    """Evaluate after pass k (1-based)?"""
    if k == total:
        return True
    return bool(p.eval_every) and k % p.eval_every == 0 and k > p.eval_after * p.epochs


def train_and_test(p: Protocol, train: TensorSet, test: TensorSet, *, seed: int, num_classes: int,
                   norm: Normalization, opts: RunOptions = RunOptions(), teacher: nn.Module | None = None,
                   return_model: bool = False) -> dict:
    """Train a fresh `p.arch` on `train` under protocol `p` (resolved) and test it on `test`.

    Returns {"seed", "final_acc", "best_acc", "best_epoch", "last_acc", "train_seconds",
    "epochs", "evaluations": [[epoch, acc], ...], "images_per_s"} (accuracies in %)."""
    device = resolve_device(opts.device)
    if len(train) == 0:
        raise Mgd3Error("the training set is empty")
    if p.loss == "kl" and teacher is None:
        raise Mgd3Error(f"protocol {p.name} needs a teacher network (soft labels)")
    channels, resolution = int(train.images.shape[1]), int(train.images.shape[-1])
    model = build_network(p.arch, channels, num_classes, resolution, seed=seed).to(device)
    model.train()
    fwd = torch.compile(model) if opts.compile else model
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))  # batch order and augmentation draws
    rng = np.random.default_rng(int(seed))  # CutMix's Beta draws (as IDC, numpy)
    train_d, test_d = train.to(device), test.to(device)
    mean, std = norm.tensors(device)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    total = p.epochs + 1 if (p.schedule == "dc" and p.dc_extra_epoch) else p.epochs
    opt = _optimizer(p, model.parameters(), p.lr)
    n, bs = len(train_d), p.batch_size
    eval_bs = _eval_batch(resolution, opts)
    evaluations: list[list] = []
    train_seconds = 0.0
    bar = tqdm(range(total), desc=f"{p.name}/{p.arch} seed {seed}", unit="epoch", disable=not opts.progress,
               leave=False)
    for ep in bar:
        t0 = time.perf_counter()
        f = lr_factor(p, ep, total)
        if p.schedule == "dc" and ep > 0 and f != lr_factor(p, ep - 1, total):
            opt = _optimizer(p, model.parameters(), p.lr * f)  # DC code re-creates SGD (momentum reset)
        for g in opt.param_groups:
            g["lr"] = p.lr * f
        loss_sum = torch.zeros((), device=device)
        perm = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            xb = train_d.images.index_select(0, idx)  # (b, C, R, R) uint8
            yb = train_d.targets.index_select(0, idx)
            if p.augment in ("minimax", "crop-flip"):
                x = xb.float() / 255.0  # [0, 1]
                if p.augment == "minimax":
                    x = A.minimax_transform(x, gen, rrc_scale=p.rrc_scale, jitter=p.jitter, lighting_std=p.lighting)
                else:
                    x = A.random_hflip(A.random_resized_crop(x, gen, scale=p.rrc_scale), gen)
                x = (x - mean) / std
            else:
                x = xb.float() * scale + shift  # normalised
                if p.augment == "dsa":
                    x = A.dsa(x, p.dsa, gen)
            perm_b, ratio = None, 1.0
            if p.cutmix_beta > 0 and x.shape[0] > 1:
                x, perm_b, ratio = A.cutmix(x, p.cutmix_beta, gen, rng)
            with _autocast(device, opts.bf16):
                out = fwd(x)  # (b, classes)
                if p.loss == "kl":
                    with torch.no_grad():
                        soft = F.softmax(teacher(x).float() / p.temperature, dim=1)
                    loss = F.kl_div(F.log_softmax(out.float() / p.temperature, dim=1), soft, reduction="batchmean")
                elif perm_b is not None:
                    loss = ratio * F.cross_entropy(out.float(), yb) + \
                        (1 - ratio) * F.cross_entropy(out.float(), yb.index_select(0, perm_b))
                else:
                    loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * x.shape[0]
        train_seconds += time.perf_counter() - t0
        k = ep + 1
        if _should_eval(p, k, total):
            acc = accuracy(fwd, test_d, norm, device=device, batch_size=eval_bs, bf16=opts.bf16)
            evaluations.append([k, round(acc, 2)])
            bar.set_postfix(loss=f"{float(loss_sum) / n:.3f}", acc=f"{acc:.1f}")
            log.debug("%s seed %d epoch %d: test accuracy %.2f", p.name, seed, k, acc)
    best_epoch, best = max(evaluations, key=lambda e: (e[1], -e[0]))
    last = evaluations[-1][1]
    out = {"seed": int(seed), "final_acc": best if p.report == "best" else last, "best_acc": best,
           "best_epoch": int(best_epoch), "last_acc": last, "train_seconds": round(train_seconds, 2),
           "epochs": total, "images_per_s": round(total * n / max(train_seconds, 1e-9), 1),
           "evaluations": evaluations}
    if return_model:
        out["model"] = model
    return out
