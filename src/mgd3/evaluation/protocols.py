"""Stage: evaluation protocols (docs/METHODS.md §5) — one frozen dataclass config per protocol, in a registry.

* `dc`: the DC/DSA code's `evaluate_synset` without augmentation (Zhao et al. 2021).
* `dc-dsa`: the same with DSA, 1000 epochs.
* `minimax`: IDC's ImageNet evaluation as MinimaxDiffusion / MGD3 report it (Kim et al. 2022,
  `argument.py` / `test.py`; Gu et al. 2024).
* `soft`: RDED's student training with teacher soft labels (Sun et al. 2024, `validation/main.py`).

`resolve` fills the fields that depend on the set (epochs and batch size by IPC and class
count, resolution, DSA strategy for digits, lr for >= 100 classes) so the config written to
eval.json is the one that ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mgd3.errors import Mgd3Error
from mgd3.evaluation.augment import DSAParams
from mgd3.registry import Registry

# data sets that must not be flipped (DSA code: MNIST drops "flip" from the strategy)
NO_FLIP_DATA = ("digits", "mnist")
IMAGENET_SIZE = 224


@dataclass(frozen=True)
class Protocol:
    """How to train and test one evaluation network. Fields left None are resolved per set."""

    name: str
    arch: str
    epochs: int | None  # None: by IPC and class count (minimax rule)
    batch_size: int | None  # None: by IPC and class count (RDED rule)
    optimizer: str  # "sgd" | "adamw"
    lr: float
    momentum: float
    weight_decay: float
    schedule: str  # "dc" | "multistep" | "rded-cosine" | "cosine" | "constant"
    normalize: str  # "dataset" (mean/std of the real train split) | "imagenet"
    augment: str  # "none" | "dsa" | "minimax" | "crop-flip"
    report: str  # "last" (accuracy after the last epoch) | "best" (best of the evaluations)
    eval_every: int | None = 0  # epochs between test evaluations; 0: after the last epoch only; None: epochs // 100
    eval_after: float = 0.0  # evaluate only after this fraction of the epochs (RDED: 0.8)
    milestones: tuple[float, ...] = ()  # multistep: fractions of the epochs
    gamma: float = 0.1
    dc_extra_epoch: bool = False  # DC code quirk: `range(Epoch + 1)` passes, lr x0.1 after pass Epoch//2+1
    dsa: DSAParams | None = None
    rrc_scale: tuple[float, float] = (0.5, 1.0)
    jitter: float = 0.4
    lighting: float = 0.1
    cutmix_beta: float = 0.0  # 0: no CutMix; else CutMix on every batch with Beta(beta, beta)
    loss: str = "ce"  # "ce" | "kl" (soft labels from the teacher)
    temperature: float = 1.0
    resolution: int | None = None  # None: the set's own (minimax / soft: at most 224)
    test_resize: float = 1.0  # test: resize to R * test_resize, centre crop R (RDED: 8/7) for R >= 128
    # soft labels: the teacher (same arch, full real train split), trained once and cached
    teacher_epochs: int = 0
    teacher_batch_size: int = 256
    teacher_lr: float = 0.01
    many_classes: dict = field(default_factory=dict)  # overrides for >= 100 classes (IDC argument.py)

    def describe(self) -> str:
        if self.report == "best":
            every = self.eval_every or self.epochs
            after = f" in the last {1 - self.eval_after:.0%} of training" if self.eval_after else ""
            return f"best test accuracy of the evaluations every {every} epochs{after} (and after the last)"
        if self.schedule == "dc" and self.dc_extra_epoch:
            return (f"test accuracy after the last epoch (as the DC code: {self.epochs} + 1 passes, "
                    f"lr x0.1 after pass {self.epochs // 2 + 1})")
        return "test accuracy after the last epoch"


PROTOCOLS: Registry[Protocol] = Registry("protocol")

_DC = dict(arch="convnet-3", batch_size=256, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
           schedule="dc", normalize="dataset", report="last", dc_extra_epoch=True)
PROTOCOLS.add("dc", Protocol(name="dc", epochs=300, augment="none", **_DC))
PROTOCOLS.add("dc-dsa", Protocol(name="dc-dsa", epochs=1000, augment="dsa", dsa=DSAParams(), **_DC))
PROTOCOLS.add("minimax", Protocol(
    name="minimax", arch="resnetap-10", epochs=None, batch_size=64, optimizer="sgd", lr=0.01, momentum=0.9,
    weight_decay=5e-4, schedule="multistep", milestones=(2 / 3, 5 / 6), gamma=0.2, normalize="imagenet",
    augment="minimax", report="best", eval_every=None, cutmix_beta=1.0,
    many_classes={"lr": 0.1, "weight_decay": 1e-4, "batch_size": 128}))
PROTOCOLS.add("soft", Protocol(
    name="soft", arch="resnet-18", epochs=300, batch_size=None, optimizer="adamw", lr=1e-3, momentum=0.9,
    weight_decay=0.01, schedule="rded-cosine", normalize="imagenet", augment="crop-flip", report="best",
    eval_every=10, eval_after=0.8, cutmix_beta=1.0, loss="kl", temperature=20.0, test_resize=8 / 7,
    teacher_epochs=50))


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)


def minimax_epochs(ipc: int, num_classes: int) -> int:
    """IDC `ipc_epoch`: 3000 / 2000 / 1500 / 1000 / 500 / 300 epochs for IPC 1 / <=10 / <=50 /
    <=200 / <=500 / more; x 2/3 (down to a multiple of 100) for 100 classes and more."""
    if ipc <= 1:
        e = 3000
    elif ipc <= 10:
        e = 2000
    elif ipc <= 50:
        e = 1500
    elif ipc <= 200:
        e = 1000
    elif ipc <= 500:
        e = 500
    else:
        e = 300
    if num_classes >= 100:
        e = int(2 / 3 * e)
        e -= e % 100
    return e


def rded_batch_size(ipc: int, num_classes: int, n_images: int) -> int:
    """RDED `argument.py`: 10 / 50 / 100 for IPC 1 / 10 / 50 (x2 for >= 100 classes), at most N."""
    b = 10 if ipc <= 1 else (50 if ipc <= 10 else 100)
    if num_classes >= 100:
        b *= 2
    return max(1, min(b, n_images))


def override(p: Protocol, **changes) -> Protocol:
    """A copy with fields replaced; unknown fields are a one-line Mgd3Error."""
    names = {f.name for f in dataclasses.fields(Protocol)}
    bad = sorted(set(changes) - names)
    if bad:
        raise Mgd3Error(f"unknown protocol option(s) {', '.join(bad)}; known: {', '.join(sorted(names))}")
    if isinstance(changes.get("dsa"), dict):
        changes["dsa"] = DSAParams(**changes["dsa"])
    return dataclasses.replace(p, **changes)


def resolve(p: Protocol, *, ipc: int, num_classes: int, n_images: int, set_resolution: int,
            data_name: str, arch: str | None = None, epochs: int | None = None,
            batch_size: int | None = None, resolution: int | None = None) -> Protocol:
    """Fill every per-set field: the config that will run (and be written to eval.json)."""
    ch: dict = {}
    if arch:
        ch["arch"] = arch.lower()
    if num_classes >= 100 and p.many_classes:
        ch.update({k: (max(v, p.batch_size or 0) if k == "batch_size" else v) for k, v in p.many_classes.items()})
    e = epochs if epochs is not None else (p.epochs if p.epochs is not None else minimax_epochs(ipc, num_classes))
    if e < 1:
        raise Mgd3Error(f"epochs must be at least 1, got {e}")
    ch["epochs"] = int(e)
    b = batch_size or ch.get("batch_size") or p.batch_size or rded_batch_size(ipc, num_classes, n_images)
    if b < 1:
        raise Mgd3Error(f"batch size must be at least 1, got {b}")
    ch["batch_size"] = int(b)
    if p.eval_every is None:
        ch["eval_every"] = max(1, int(e) // 100)
    if resolution:
        ch["resolution"] = int(resolution)
    elif p.resolution is None:
        ch["resolution"] = int(set_resolution if p.normalize == "dataset" else min(set_resolution, IMAGENET_SIZE))
    if p.dsa is not None and data_name.lower() in NO_FLIP_DATA:
        ch["dsa"] = dataclasses.replace(p.dsa, strategy="_".join(o for o in p.dsa.strategy.split("_") if o != "flip"))
    return dataclasses.replace(p, **ch)


def to_dict(p: Protocol) -> dict:
    d = dataclasses.asdict(p)
    d["milestones"] = list(p.milestones)
    d["rrc_scale"] = list(p.rrc_scale)
    return d
