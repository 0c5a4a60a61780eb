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
from typing import NamedTuple

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
    r, c = getattr(dataset, "resolution", None), getattr(dataset, "channels", None)
    if r and c:  # the uint8 set and one float batch in flight, before anything is allocated
        from mgd3.config import check_memory

        check_memory(n * c * r * r + 2 * min(n, batch_size) * c * r * r * 4,
                     f"{desc}: {n} images at {r}x{r} pixels", "use a smaller --resolution (or a set of that size)")
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


@dataclass(frozen=True)
class Shard:
    """This process's part of one training spread over a torchrun launch (DistributedDataParallel).

    Every process draws the same batch order and augmentations from the run's seed, so each
    global batch is the single process's batch; process `rank` keeps items rank, rank + world,
    ... of it (DistributedSampler's split, applied per batch). The loss is the batch sum over the
    shard x world / global batch, so DDP's gradient average is the single process's batch-mean
    gradient. The test split is scored in `world` contiguous chunks and the correct counts summed."""

    rank: int
    world: int
    group: object = None  # process group of the gradients and counts (None: the default one)

    def items(self, b: int, device) -> tuple[Tensor, float]:
        """(indices of this shard in a global batch of b, loss weight)."""
        if self.rank >= b:  # a last batch smaller than the launch: join DDP's all-reduce with nothing
            return torch.zeros(1, dtype=torch.int64, device=device), 0.0
        return torch.arange(self.rank, b, self.world, device=device), self.world / b


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
             batch_size: int = 512, bf16: bool = False, shard: Shard | None = None) -> float:
    """Top-1 accuracy (%) on `test` (uint8 images), in batches, under no_grad. With `shard`,
    this process scores its contiguous chunk and the correct counts are summed over the launch."""
    was_training = model.training
    model.eval()
    mean, std = norm.tensors(device)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    correct = torch.zeros((), dtype=torch.int64, device=device)
    lo, hi = 0, len(test)
    if shard is not None:
        per = -(-len(test) // shard.world)
        lo, hi = min(len(test), shard.rank * per), min(len(test), (shard.rank + 1) * per)
    for i in range(lo, hi, batch_size):
        j = min(hi, i + batch_size)
        x = test.images[i:j].to(device, non_blocking=True).float() * scale + shift
        with _autocast(device, bf16):
            out = model(x)  # (b, classes)
        correct += (out.argmax(1) == test.targets[i:j].to(device)).sum()
    if shard is not None:
        import torch.distributed as dist

        dist.all_reduce(correct, group=shard.group)  # integer counts: exact in any order
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
                   return_model: bool = False, shard: Shard | None = None, checkpoint=None) -> dict:
    """Train a fresh `p.arch` on `train` under protocol `p` (resolved) and test it on `test`.

    `shard`: this process's part of a DistributedDataParallel training (see `Shard`); every
    process of the launch calls this with the same arguments and gets the same result.
    `checkpoint` (`mgd3.evaluation.checkpoint.Checkpoint`): resume from its state and save one
    after epochs; the result is the uninterrupted run's.

    Returns {"seed", "final_acc", "best_acc", "best_epoch", "last_acc", "train_seconds",
    "epochs", "evaluations": [[epoch, acc], ...], "images_per_s"} (accuracies in %)."""
    device = resolve_device(opts.device)
    if len(train) == 0:
        raise Mgd3Error("the training set is empty")
    if p.loss == "kl" and teacher is None:
        raise Mgd3Error(f"protocol {p.name} needs a teacher network (soft labels)")
    channels, resolution = int(train.images.shape[1]), int(train.images.shape[-1])
    model = _fresh_model(p, channels, num_classes, resolution, seed, shard, device)
    teacher = _frozen_teacher(teacher, device)
    gen = torch.Generator().manual_seed(int(seed))  # batch order and augmentation draws
    rng = np.random.default_rng(int(seed))  # CutMix's Beta draws (as IDC, numpy)
    train_d, test_d = train.to(device), test.to(device)
    mean, std = norm.tensors(device)
    pixels = _Pixels(mean, std, 1.0 / (255.0 * std), -mean / std)
    total = p.epochs + 1 if (p.schedule == "dc" and p.dc_extra_epoch) else p.epochs
    opt = _optimizer(p, model.parameters(), p.lr)
    eval_bs = _eval_batch(resolution, opts)
    evaluations: list[list] = []
    train_seconds = 0.0
    start = 0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:  # continue exactly where the saved epoch ended
        start, evaluations, train_seconds = restore(state, model, opt, gen, rng, p, total)
    fwd = _forward(model, shard, device, opts.compile)
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"{p.name}/{p.arch} seed {seed}",
               unit="epoch", disable=not opts.progress, leave=False)
    for ep in bar:
        t0 = time.perf_counter()
        opt = _epoch_optimizer(p, opt, model, ep, total)
        loss_sum = _train_epoch(p, fwd, opt, teacher, train_d, gen, rng, pixels, shard, device, opts.bf16)
        train_seconds += time.perf_counter() - t0
        k = ep + 1
        if _should_eval(p, k, total):
            acc = accuracy(fwd if shard is None else model, test_d, norm, device=device, batch_size=eval_bs,
                           bf16=opts.bf16, shard=shard)
            evaluations.append([k, round(acc, 2)])
            bar.set_postfix(loss=f"{float(loss_sum) / len(train_d):.3f}", acc=f"{acc:.1f}")
            log.debug("%s seed %d epoch %d: test accuracy %.2f", p.name, seed, k, acc)
        if checkpoint is not None and k < total and checkpoint.due():
            checkpoint.save(snapshot(k, model, opt, gen, rng, evaluations, train_seconds))
    return _result(p, seed, evaluations, train_seconds, total, len(train_d), model if return_model else None)


class _Pixels(NamedTuple):
    """uint8 pixels -> normalised input, on the training device: (x01 - mean) / std, or in one
    multiply-add from the raw bytes, x * scale + shift. Each (1, C, 1, 1)."""

    mean: Tensor
    std: Tensor
    scale: Tensor
    shift: Tensor


def _fresh_model(p: Protocol, channels: int, num_classes: int, resolution: int, seed: int, shard: Shard | None,
                 device: torch.device) -> nn.Module:
    """The network to train: `p.arch` initialised from `seed`, on `device`, in training mode."""
    model = build_network(p.arch, channels, num_classes, resolution, seed=seed)
    if shard is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # batch statistics over the global batch, as one process computes them
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=shard.group)
    model = model.to(device)
    model.train()
    return model


def _frozen_teacher(teacher: nn.Module | None, device: torch.device) -> nn.Module | None:
    """The soft-label teacher on `device`, in eval mode, without gradients (None stays None)."""
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
    return teacher


def _forward(model: nn.Module, shard: Shard | None, device: torch.device, compiled: bool) -> nn.Module:
    """What the training batches go through: `model`, wrapped in DistributedDataParallel for a
    shard, compiled with `torch.compile` when asked."""
    net = model
    if shard is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      process_group=shard.group)
    return torch.compile(net) if compiled else net


def _epoch_optimizer(p: Protocol, opt: torch.optim.Optimizer, model: nn.Module, ep: int,
                     total: int) -> torch.optim.Optimizer:
    """The optimizer of pass `ep` with the schedule's lr set."""
    f = lr_factor(p, ep, total)
    if p.schedule == "dc" and ep > 0 and f != lr_factor(p, ep - 1, total):
        opt = _optimizer(p, model.parameters(), p.lr * f)  # DC code re-creates SGD (momentum reset)
    for g in opt.param_groups:
        g["lr"] = p.lr * f
    return opt


def _train_epoch(p: Protocol, fwd, opt: torch.optim.Optimizer, teacher, train_d: TensorSet, gen: torch.Generator,
                 rng: np.random.Generator, pixels: _Pixels, shard: Shard | None, device: torch.device,
                 bf16: bool) -> Tensor:
    """One pass over `train_d` in a batch order drawn from `gen`; the summed loss (for the progress bar)."""
    loss_sum = torch.zeros((), device=device)
    n, bs = len(train_d), p.batch_size
    perm = torch.randperm(n, generator=gen).to(device)
    for s in range(0, n, bs):
        idx = perm[s:s + bs]
        xb = train_d.images.index_select(0, idx)  # (b, C, R, R) uint8
        yb = train_d.targets.index_select(0, idx)
        x = _augmented(p, xb, gen, pixels)
        perm_b, ratio = None, 1.0
        if p.cutmix_beta > 0 and x.shape[0] > 1:
            x, perm_b, ratio = A.cutmix(x, p.cutmix_beta, gen, rng)
        if shard is not None:
            loss = _shard_loss(p, fwd, teacher, x, yb, perm_b, ratio, shard, device, bf16)
        else:
            loss = _batch_loss(p, fwd, teacher, x, yb, perm_b, ratio, device, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * x.shape[0]
    return loss_sum


def _augmented(p: Protocol, xb: Tensor, gen: torch.Generator, pixels: _Pixels) -> Tensor:
    """A uint8 batch (b, C, R, R) normalised and augmented under `p` (draws from `gen`)."""
    if p.augment in ("minimax", "crop-flip"):
        x = xb.float() / 255.0  # [0, 1]
        if p.augment == "minimax":
            x = A.minimax_transform(x, gen, rrc_scale=p.rrc_scale, jitter=p.jitter, lighting_std=p.lighting)
        else:
            x = A.random_hflip(A.random_resized_crop(x, gen, scale=p.rrc_scale), gen)
        return (x - pixels.mean) / pixels.std
    x = xb.float() * pixels.scale + pixels.shift  # normalised
    if p.augment == "dsa":
        x = A.dsa(x, p.dsa, gen)
    return x


def _batch_loss(p: Protocol, fwd, teacher, x: Tensor, yb: Tensor, perm_b, ratio: float, device: torch.device,
                bf16: bool) -> Tensor:
    """The batch-mean loss of one process's training: cross-entropy (mixed for CutMix) or the
    KL divergence to the teacher's soft labels."""
    with _autocast(device, bf16):
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
    return loss


def _result(p: Protocol, seed: int, evaluations: list, train_seconds: float, total: int, n: int,
            model: nn.Module | None) -> dict:
    """`train_and_test`'s record of a finished training (with the model when it is given)."""
    best_epoch, best = max(evaluations, key=lambda e: (e[1], -e[0]))
    last = evaluations[-1][1]
    out = {"seed": int(seed), "final_acc": best if p.report == "best" else last, "best_acc": best,
           "best_epoch": int(best_epoch), "last_acc": last, "train_seconds": round(train_seconds, 2),
           "epochs": total, "images_per_s": round(total * n / max(train_seconds, 1e-9), 1),
           "evaluations": evaluations}
    if model is not None:
        out["model"] = model
    return out


def _shard_loss(p: Protocol, fwd, teacher, x: Tensor, yb: Tensor, perm_b, ratio: float, shard: Shard,
                device: torch.device, bf16: bool) -> Tensor:
    """This process's share of the global batch's mean loss, weighted so that DDP's gradient
    average over the launch is the gradient of the global batch mean (see `Shard`)."""
    mine, w = shard.items(x.shape[0], device)
    xs, ys = x.index_select(0, mine), yb.index_select(0, mine)  # (b / world, ...)
    with _autocast(device, bf16):
        out = fwd(xs)  # (b / world, classes)
        if p.loss == "kl":
            with torch.no_grad():  # the teacher's soft labels of this shard's augmented images
                soft = F.softmax(teacher(xs).float() / p.temperature, dim=1)
            loss = F.kl_div(F.log_softmax(out.float() / p.temperature, dim=1), soft, reduction="sum")
        elif perm_b is not None:
            y2 = yb.index_select(0, perm_b).index_select(0, mine)  # CutMix partners' labels
            loss = ratio * F.cross_entropy(out.float(), ys, reduction="sum") + \
                (1 - ratio) * F.cross_entropy(out.float(), y2, reduction="sum")
        else:
            loss = F.cross_entropy(out.float(), ys, reduction="sum")
    return loss * w


def snapshot(k: int, model: nn.Module, opt, gen: torch.Generator, rng: np.random.Generator,
             evaluations: list, train_seconds: float) -> dict:
    """The training state after pass k: what `restore` needs to continue bit for bit."""
    import json

    return {"epoch": int(k), "model": {n: v.detach().cpu() for n, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "generator": gen.get_state(),
            "numpy_rng": json.dumps(rng.bit_generator.state), "evaluations": json.dumps(evaluations),
            "train_seconds": float(train_seconds)}


def restore(state: dict, model: nn.Module, opt, gen: torch.Generator, rng: np.random.Generator,
            p: Protocol, total: int) -> tuple[int, list, float]:
    """Load a `snapshot` into a fresh model / optimizer / generators; (next pass, evaluations, seconds)."""
    import json

    k = int(state["epoch"])
    if not 1 <= k < total:
        raise Mgd3Error(f"checkpoint after pass {k} does not fit a training of {total} passes")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    return k, json.loads(state["evaluations"]), float(state["train_seconds"])
