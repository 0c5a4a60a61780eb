"""Method `dm`: Distribution Matching (Zhao & Bilen, "Dataset Condensation with Distribution
Matching", WACV 2023; official code VICO-UoE/DatasetCondensation `main_DM.py`).

Not training-free and not generative: the synthetic images themselves are optimised, in pixel
space at the data's own resolution (the diffusion model is not used). Per class c, with S_c the
IPC synthetic images and T_c the real ones (the paper's objective with DSA; the code's ConvNet branch):

    min_S  Σ_c || 1/|B_c| Σ_{x∈B_c} ψ_θ(A_ω(x)) − 1/|S_c| Σ_{s∈S_c} ψ_θ(A_ω(s)) ||²

* ψ_θ: the feature extractor of a ConvNet (`features`, flattened: the code's `embed`) with
  freshly randomly initialised weights θ in every iteration, frozen (only S is optimised);
* B_c: a random batch of real images of class c (`--batch-real`, code default 256);
* A_ω: DSA (`color_crop_cutout_flip_scale_rotate`) with the SAME sampled parameters ω for the
  real and the synthetic batch (the code seeds both `DiffAugment` calls alike; here two
  generators with one seed and `DSAParams(same_params=True)`, one parameter set per batch);
* S initialised from random real images (the code's `--init real`), or from any distilled
  set with `--init DIR` (e.g. an MGD³ set: "MGD³ + DM refinement");
* SGD on the images, lr 1.0, momentum 0.5 (`--lr_img 1.0`, `SGD(momentum=0.5)`), 20 000
  iterations (`--Iteration 20000`; the code's loop runs Iteration + 1 updates).

Images live in the evaluation's normalised space ((x − mean) / std of the real train split, as
the DC code's data loaders), where DSA acts, and are written back as [0, 1] PNGs (clipped).

The loss is a sum over classes and the gradient of S_c comes from its own term only, and SGD
acts element-wise, so classes are optimised one after another with the same network per
iteration (seeded by (seed, iteration)) — the joint loop of the code, class by class. Every
random draw is seeded from (seed, class, iteration), so a checkpoint of (images, momentum,
iteration) in the run's resume area resumes to the same result as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mgd3.errors import Mgd3Error
from mgd3.methods import METHODS, Batch, Method, option

log = logging.getLogger(__name__)

CHECKPOINT_S = 60.0  # seconds between resume checkpoints of a class (and one when it finishes)
EMBED_NETS = ("convnet-3", "convnet-6")  # networks with a `features` extractor (DC ConvNet)
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DMOptions:
    iterations: int = option(20000, "DM: optimisation iterations (paper / official code: 20000)")
    lr_img: float = option(1.0, "DM: SGD learning rate of the synthetic images (official: 1.0)")
    img_momentum: float = option(0.5, "DM: SGD momentum of the synthetic images (official: 0.5)")
    batch_real: int = option(256, "DM: real images per class per iteration (official: 256)")
    dsa_strategy: str = option(DEFAULT_STRATEGY, "DM: DSA strategy, ops joined by _ ('none': no augmentation)")
    embed_net: str = option("convnet-3", "DM: randomly initialised feature extractor", choices=EMBED_NETS)
    init: str | None = option(None, "DM: start from this distilled set (same data, classes, resolution, "
                                    "channels and IPC) instead of random real images")


def _seed(*parts) -> int:
    """A 63-bit seed from its parts (stable across runs, processes and batch sizes)."""
    return int(hashlib.sha256("dm/".join(map(str, ("",) + parts)).encode()).hexdigest()[:15], 16)


def embed(net: torch.nn.Module, x: Tensor) -> Tensor:
    """The ConvNet's features before the classifier, flattened (the DC code's `embed`)."""
    return net.features(x).flatten(1)  # (B, D)


def matching_loss(net: torch.nn.Module, real: Tensor, syn: Tensor) -> Tensor:
    """|| mean ψ(real) − mean ψ(syn) ||², the real side without gradient."""
    with torch.no_grad():
        mean_real = embed(net, real).mean(0)  # (D,)
    return ((mean_real - embed(net, syn).mean(0)) ** 2).sum()


def dsa_params(strategy: str):
    from mgd3.evaluation.augment import DSAParams

    return None if strategy.lower() == "none" else DSAParams(strategy=strategy, same_params=True)


def optimise_class(syn: Tensor, real: Tensor, *, seed: int, class_id: str, iterations: int, lr: float,
                   momentum: float, batch_real: int, strategy: str, embed_net: str, num_classes: int,
                   state: dict | None = None, save=None, progress: bool = False) -> dict:
    """DM for one class. syn (IPC, C, R, R) and real (N, C, R, R) in normalised space.
    `state` ({"images", "opt", "iteration", "losses"}) continues an interrupted optimisation;
    `save(state)` is called every CHECKPOINT_S seconds and at the end. Returns the final state."""
    from mgd3.evaluation.augment import dsa
    from mgd3.evaluation.networks import build_network

    params = dsa_params(strategy)
    images = (state["images"] if state else syn).detach().clone().float().requires_grad_(True)
    opt = torch.optim.SGD([images], lr=lr, momentum=momentum)  # as the code's optimizer_img
    if state:
        opt.load_state_dict(state["opt"])
    start = int(state["iteration"]) if state else 0
    losses = list(state["losses"]) if state else []
    c, r = images.shape[1], images.shape[-1]
    n_real = len(real)
    last = time.monotonic()
    bar = tqdm(range(start, iterations), initial=start, total=iterations, desc=f"DM {class_id}", unit="it",
               disable=not progress, leave=False)
    for it in bar:
        # one network per iteration, the same for every class (seeded by the iteration only)
        net = build_network(embed_net, c, num_classes, r, seed=_seed(seed, "net", it))
        net.train().requires_grad_(False)
        rng = np.random.default_rng(_seed(seed, "real", class_id, it))
        idx = torch.from_numpy(rng.choice(n_real, size=min(batch_real, n_real), replace=False))
        x_real, x_syn = real[idx], images  # (B, C, R, R), (IPC, C, R, R)
        if params is not None:
            s = _seed(seed, "dsa", class_id, it)  # one seed: the same op and parameters for both
            x_real = dsa(x_real, params, torch.Generator().manual_seed(s))
            x_syn = dsa(x_syn, params, torch.Generator().manual_seed(s))
        loss = matching_loss(net, x_real, x_syn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if save is not None and (time.monotonic() - last >= CHECKPOINT_S or it + 1 == iterations):
            save({"images": images.detach().clone(), "opt": opt.state_dict(), "iteration": it + 1,
                  "losses": losses})
            last = time.monotonic()
    bar.close()
    return {"images": images.detach(), "opt": opt.state_dict(), "iteration": max(iterations, start),
            "losses": losses}


def _class_images(ctx, indices) -> Tensor:
    """uint8 (N, C, R, R) of data items."""
    from mgd3.evaluation.train import tensor_set

    return tensor_set(ctx.data.dataset(indices)).images


@METHODS.register("dm")
class DM(Method):
    """Distribution Matching: synthetic images optimised to match random-ConvNet mean embeddings."""

    name = "dm"
    generative = False
    needs = "nothing"
    training_free = False
    Options = DMOptions

    def __init__(self, options=None):
        super().__init__(options or DMOptions())
        self.init_images: dict[int, Tensor] = {}  # class index -> uint8 (IPC, C, R, R) from --init
        self.result: dict[int, Tensor] = {}  # class index -> images (IPC, C, R, R) in [-1, 1]
        self.losses: dict[str, list[float]] = {}
        self.norm = None

    # ------------------------------------------------------------------ checks
    def validate(self, ctx):
        o = self.options
        if o.iterations < 0:
            raise Mgd3Error(f"--iterations must be at least 0, got {o.iterations}")
        if not (o.lr_img > 0 and np.isfinite(o.lr_img)):
            raise Mgd3Error(f"--lr-img must be a finite number > 0, got {o.lr_img}")
        if not (0 <= o.img_momentum < 1):
            raise Mgd3Error(f"--img-momentum must be in [0, 1), got {o.img_momentum}")
        if o.batch_real < 1:
            raise Mgd3Error(f"--batch-real must be at least 1, got {o.batch_real}")
        if o.embed_net not in EMBED_NETS:
            raise Mgd3Error(f"--embed-net {o.embed_net!r} is not one of {', '.join(EMBED_NETS)}")
        if o.dsa_strategy.lower() != "none":
            from mgd3.evaluation.augment import DSA_OPS

            bad = [op for op in o.dsa_strategy.split("_") if op not in DSA_OPS]
            if bad or not o.dsa_strategy:
                raise Mgd3Error(f"--dsa-strategy: unknown op {bad[0] if bad else ''!r}; known: "
                                f"{', '.join(DSA_OPS)} (joined by _), or none")
        if o.init is None:
            ctx.check_class_sizes()
        else:
            self._read_init(ctx, o.init)

    def _read_init(self, ctx, path: str) -> None:
        """Check that the set at `path` fits this run (data, classes, resolution, channels,
        IPC) and keep its images; any mismatch is a one-line error naming it."""
        from mgd3.evaluation.core import _channels_of, _resolution_of, load_set_images, read_set

        s = read_set(path)
        d = ctx.data
        where = f"--init {path}"
        name = s.data.get("name")
        same_data = s.data.get("fingerprint") == d.fingerprint()  # e.g. one image folder under two paths
        if name is not None and not same_data and str(name).split(":")[0] != str(d.name):
            raise Mgd3Error(f"{where} is a set of data {name!r}, not {d.name!r}")
        res = int(s.data.get("resolution") or 0) or _resolution_of(s)
        ch = int(s.data.get("channels") or 0) or _channels_of(s)
        if res != d.resolution:
            raise Mgd3Error(f"{where} has {res}x{res} images; this run's data is {d.resolution}x{d.resolution}")
        if ch != d.channels:
            raise Mgd3Error(f"{where} has {ch}-channel images; this run's data has {d.channels}")
        want = [c.class_id for c in ctx.all_classes]
        if sorted(s.class_ids) != sorted(want):
            extra = sorted(set(s.class_ids) - set(want))
            missing = sorted(set(want) - set(s.class_ids))
            what = f"lacks class {missing[0]!r}" if missing else f"has class {extra[0]!r} this run does not"
            raise Mgd3Error(f"{where} {what} (its classes: {', '.join(s.class_ids)})")
        counts = np.bincount(s.targets, minlength=len(s.class_ids))
        if s.ipc != ctx.ipc or counts.min() != ctx.ipc or counts.max() != ctx.ipc:
            raise Mgd3Error(f"{where} has IPC {s.ipc} ({counts.min()}..{counts.max()} images per class); "
                            f"this run has --ipc {ctx.ipc}")
        images = load_set_images(s, d.resolution, d.channels).images  # uint8 (N, C, R, R), manifest order
        pos = {cid: i for i, cid in enumerate(s.class_ids)}
        for c in ctx.all_classes:
            self.init_images[c.index] = images[torch.from_numpy(np.flatnonzero(s.targets == pos[c.class_id]))]

    # ------------------------------------------------------------------ run
    def prepare(self, ctx):
        from mgd3.evaluation import references as R
        from mgd3.evaluation.train import tensor_set

        d = ctx.data
        self.ipc = ctx.ipc
        self.norm = R.cached_normalization(d.fingerprint(), lambda: tensor_set(d.dataset()))
        if self.options.init is None:
            from mgd3.methods.real import RandomReal

            chooser = RandomReal()  # the random-real set of the same seed is DM's starting point
            chooser.prepare(ctx)
            for c in ctx.classes:
                self.init_images[c.index] = _class_images(ctx, chooser.chosen[c.index])
        run_dir = ctx.run_dir
        for c in ctx.classes:  # loss records of classes an interrupted run finished
            state = self._load_state(run_dir, c) if run_dir is not None else None
            if state is not None:
                self.losses[c.class_id] = list(state["losses"])

    def _normalise(self, u8: Tensor) -> Tensor:
        mean = torch.tensor(self.norm.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.norm.std).view(1, -1, 1, 1)
        return (u8.float() / 255.0 - mean) / std

    def _to_model_space(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.norm.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.norm.std).view(1, -1, 1, 1)
        return ((x * std + mean) * 2.0 - 1.0).clamp(-1.0, 1.0)

    def _checkpoint(self, run_dir: Path, c) -> Path:
        return Path(run_dir) / f"dm-{c.index:05d}.pt"

    def _load_state(self, run_dir, c) -> dict | None:
        f = self._checkpoint(run_dir, c)
        if not f.is_file():
            return None
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            ok = (isinstance(state, dict) and state["images"].shape[0] == self.ipc
                  and 0 <= int(state["iteration"]) <= self.options.iterations)
        except Exception:  # a truncated or foreign file
            ok = False
        if not ok:
            log.warning("%s is not a usable DM checkpoint; class %s starts again", f.name, c.class_id)
            return None
        return state

    def _optimise(self, ctx, c) -> None:
        from mgd3.files import save_torch_atomic as save_torch

        o = self.options
        run_dir = ctx.run_dir
        state = self._load_state(run_dir, c) if run_dir is not None else None
        if state is not None:
            log.info("DM class %s: continuing after iteration %d", c.class_id, int(state["iteration"]))
        save = None
        if run_dir is not None:
            def save(s, f=self._checkpoint(run_dir, c)):
                f.parent.mkdir(parents=True, exist_ok=True)
                save_torch(s, f)
        real = self._normalise(_class_images(ctx, ctx.data.indices(c.index)))  # (N_c, C, R, R)
        syn = self._normalise(self.init_images[c.index])  # (IPC, C, R, R)
        out = optimise_class(syn, real, seed=ctx.seed, class_id=c.class_id, iterations=o.iterations, lr=o.lr_img,
                             momentum=o.img_momentum, batch_real=o.batch_real, strategy=o.dsa_strategy,
                             embed_net=o.embed_net, num_classes=len(ctx.all_classes), state=state, save=save,
                             progress=ctx.progress)
        self.losses[c.class_id] = out["losses"]
        self.result[c.index] = self._to_model_space(out["images"])

    def generate(self, ctx, items):
        c = items[0].cls
        if c.index not in self.result:
            self._optimise(ctx, c)
        images = self.result[c.index][[it.index for it in items]]  # (B, C, R, R) in [-1, 1]
        # latents.pt as for the real-image baselines: the written images through the model's VAE
        return Batch(ctx.latents_of(images), images=images, mode_ids=[None] * len(items))

    def manifest_info(self):
        o = self.options

        def avg(xs):
            return round(float(np.mean(xs)), 6) if xs else None

        return {"training_free": False, "pixel_space": True,
                "init": o.init or "random-real (the random-real set of this seed)",
                "iterations": o.iterations, "embed_net": o.embed_net, "dsa_strategy": o.dsa_strategy,
                "dsa_same_params": True, "lr_img": o.lr_img, "img_momentum": o.img_momentum,
                "batch_real": o.batch_real,
                "normalization": {"mean": list(self.norm.mean), "std": list(self.norm.std)} if self.norm else None,
                "loss": {cid: {"first10": avg(ls[:10]), "last10": avg(ls[-10:])} for cid, ls in self.losses.items()}}
