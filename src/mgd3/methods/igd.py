"""Method `igd`: influence-guided diffusion (Chen et al., "Influence-Guided Diffusion for Dataset
Distillation", ICLR 2025; released code github.com/mchen725/DD_IGD: `sample.py`,
`test_ckpts_grad_sim.py`, `train_ckpt.sh`).

Not training-free in full: the diffusion model is untouched, but a surrogate classifier is trained
once on the real data (the manifest says `training_free: false`, `surrogate_trained: true`).

- Surrogate: ConvNet-6 (the released `--net-type convnet6`) on the run's real train images, the
  parameters kept after every epoch (epoch 0 = the initialisation), 50 epochs as
  `train_ckpt.sh`. Cached under <cache>/surrogates/ and resumed epoch by epoch; read back with
  `weights_only=True`. The released trainer (`train_ckpts.py`) is not public, so the recipe is
  mgd3's: SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine, batch 128, no augmentation.
- Real gradients (released `get_grads`): per class the first `--grad-ipc` (80) real images, in
  batches of 50; per checkpoint the cross-entropy gradient of each batch's mean loss with respect
  to every parameter, averaged over the batches.
- Checkpoints (released `test_ckpts_grad_sim.py`, threshold 0.7): epoch 0, then every epoch whose
  class-averaged cosine between its per-class gradients and those of the last kept epoch falls
  below the threshold (the released scripts hard-code the epochs that script printed).
- Influence term (released `gm_loss`, eps 1e-6): L_I = mean over kept checkpoints k of
  1 − cos(∇_θ CE(f_θk(D(x̂0)), y), ḡ_k), D the VAE decoder, x̂0 from the CFG ε.
- Deviation term: L_D = max over the class's memory (its last `--memory-size` (64) finished
  latents, the released `pseudo_memory_c`) of cos(x̂0, m), flattened.
- The step: classifier guidance with log p = −(ρ·L_I + γ·L_D), the gradient reaching x_t through
  the denoiser and the decoder: μ ← μ − σ_t²·∇ (DDPM, guided-diffusion's `condition_mean`), or
  ε ← ε + sqrt(1 − ᾱ_t)·∇ (DDIM, `condition_score`); only at training timesteps in
  [--igd-low, --igd-high] (released 500, 800). ρ = --influence-scale (released --gm-scale
  0.02), γ = --deviation-scale (released --lambda-neg / --dev-scale 0.01).

The released step itself lives in the repository's `diffusion/` package, which is not available
to this project (only `sample.py` and the scripts are); the step rule above is that of the
guided-diffusion code the DiT sampler descends from, and the released `--repeat` (a recurrence
inside the window) is not implemented. `tests/test_igd.py` transcribes the released
`get_grads`, `gm_loss` and checkpoint selection literally and checks the step against an
independent autograd transcription of the rule above.

Because of the deviation memory an image depends on the images of its class generated before it
(generation order is fixed: class-major, batch by batch; with --batch-size 1 as the released code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mgd3.errors import Mgd3Error
from mgd3.files import cache_root, cache_torch
from mgd3.methods import METHODS, Batch, Method, check_at_least, check_finite, option
from mgd3.core.sampling import Step
from mgd3.safeio import check_regular, load_error, view_problem

log = logging.getLogger(__name__)

SURROGATES = ("convnet-6", "convnet-3")
GRAD_BATCH = 50  # the released get_grads: `gap = 50`
COS_EPS = 1e-6  # the released gm_loss / cos_simf
MAX_CHECKPOINT_BYTES = 1 << 30  # a surrogate epoch file (ConvNet-6 at 256 px: about 40 MB)
SURROGATE_VERSION = "igd-surrogate-1"


# --------------------------------------------------------------------------- pieces (tested literally)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """The parameters (or their gradients) as one vector, in the model's parameter order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def cross_entropy_grad(model: nn.Module, params: dict[str, Tensor], images: Tensor, label: int, *,
                       create_graph: bool = False) -> Tensor:
    """∇_θ of the mean cross-entropy of `images` (all of class `label`) at parameters `params`, flat.
    With `create_graph` the result stays differentiable with respect to `images`."""
    with torch.enable_grad():
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        logits = torch.func.functional_call(model, leaves, (images,))
        target = torch.full((len(images),), int(label), dtype=torch.long, device=images.device)
        loss = nn.functional.cross_entropy(logits, target)
        return flat(torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph))


def real_gradient(model: nn.Module, params: dict[str, Tensor], images: Tensor, label: int,
                  batch: int = GRAD_BATCH) -> Tensor:
    """The released `get_grads` for one checkpoint: the gradient of each batch of `batch` images'
    mean loss, averaged over the batches (not weighted by their sizes)."""
    acc, n = None, 0
    for s in range(0, len(images), batch):
        g = cross_entropy_grad(model, params, images[s:s + batch], label).detach()
        acc = g if acc is None else acc + g
        n += 1
    return acc / n


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """The released `cos_simf`: a·b / (|a||b| + 1e-6)."""
    return torch.sum(a * b) / (torch.norm(a) * torch.norm(b) + COS_EPS)


def influence_loss(pseudo: Sequence[Tensor], real: Sequence[Tensor]) -> Tensor:
    """The released `gm_loss` averaged over checkpoints: mean_k (1 − cos(g_k, ḡ_k))."""
    return sum(1.0 - cosine(p, r) for p, r in zip(pseudo, real)) / len(pseudo)


def deviation_loss(x0: Tensor, memory: Tensor) -> Tensor:
    """max over the memory (M, D) of cos(x̂0, m), x̂0 flattened; 0 with an empty memory."""
    if len(memory) == 0:
        return x0.sum() * 0.0
    v = x0.reshape(1, -1)
    sims = (v * memory).sum(-1) / (torch.norm(v, dim=-1) * torch.norm(memory, dim=-1) + COS_EPS)
    return sims.max()


def select_checkpoints(class_grads: Sequence[dict[int, Tensor]], threshold: float) -> list[int]:
    """The released `test_ckpts_grad_sim.py`: keep checkpoint 0; then each checkpoint whose
    class-averaged cosine to the last kept one's per-class gradients is below `threshold`."""
    kept = [0]
    for idx in range(1, len(class_grads)):
        prev, cur = class_grads[kept[-1]], class_grads[idx]
        sim = sum(float(cosine(prev[c], cur[c])) for c in prev) / len(prev)
        if sim < threshold:
            kept.append(idx)
    return kept


# --------------------------------------------------------------------------- the surrogate


def _load_epoch(path: Path, reference: dict[str, Tensor]) -> dict | None:
    """An epoch file of the cache, or None: absent (silently), or not one mgd3 wrote for this
    surrogate (one warning): bounded in size, `weights_only=True`, every tensor of the expected shape."""
    if not path.exists():
        return None
    try:
        st = check_regular(path)
        if st.st_size > MAX_CHECKPOINT_BYTES:
            raise Mgd3Error(f"{st.st_size} bytes, more than a surrogate epoch file holds")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (Mgd3Error, OSError) as e:
        log.warning("IGD surrogate cache %s is unusable (%s); training that epoch again", path, e)
        return None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad cache file
        log.warning("IGD surrogate cache %s is unusable (%s); training that epoch again", path, load_error(e))
        return None
    params = state.get("params") if isinstance(state, dict) else None
    ok = isinstance(params, dict) and set(params) == set(reference)
    ok = ok and all(isinstance(params[k], Tensor) and params[k].shape == reference[k].shape
                    and view_problem(params[k]) is None and bool(torch.isfinite(params[k]).all()) for k in reference)
    if not ok:
        log.warning("IGD surrogate cache %s does not hold this surrogate's parameters; training that epoch again", path)
        return None
    return state


class Surrogate:
    """The surrogate network and its parameters after every epoch ([0] = the initialisation)."""

    def __init__(self, model: nn.Module, checkpoints: list[dict[str, Tensor]], seconds: float, resumed: int):
        self.model, self.checkpoints, self.seconds, self.resumed = model, checkpoints, seconds, resumed


class _Trainer:
    """The surrogate's network, optimiser, schedule and batch order, fresh or restored from an epoch file."""

    def __init__(self, arch: str, data, num_classes: int, epochs: int, seed: int, lr: float):
        from mgd3.evaluation.networks import build_network

        torch.manual_seed(seed)
        self.model = build_network(arch, data.channels, num_classes, data.resolution, seed=seed).eval()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=epochs)
        self.gen = torch.Generator().manual_seed(seed)

    def params(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def state(self) -> dict:
        return {"params": self.params(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "rng": self.gen.get_state()}

    def restore(self, state: dict) -> bool:
        try:
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.gen.set_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            return False
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(state["params"][n])
        return True

    def epoch(self, dataset, targets: np.ndarray, batch_size: int) -> float:
        """One pass in a fresh random order; the mean training loss."""
        self.model.train()
        perm = torch.randperm(len(targets), generator=self.gen).numpy()
        total = 0.0
        for s in range(0, len(perm), batch_size):
            rows = perm[s:s + batch_size]
            xb = torch.stack([dataset[int(j)][0] for j in rows])
            loss = nn.functional.cross_entropy(self.model(xb), torch.from_numpy(targets[rows]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * len(rows)
        self.sched.step()
        self.model.eval()
        return total / len(perm)


def train_surrogate(ctx, arch: str, epochs: int, per_class: int, seed: int, *, batch_size: int = 128,
                    lr: float = 0.01) -> Surrogate:
    """Train (or read back from the cache, or resume) the surrogate on the run's real train images:
    <cache>/surrogates/<key>/epoch-NNN.pt after every epoch (parameters, optimiser, schedule, RNG)."""
    data, classes = ctx.data, ctx.all_classes
    indices = [data.indices(c.index) for c in classes]
    indices = [idx[:per_class] if per_class > 0 else idx for idx in indices]
    targets = np.concatenate([np.full(len(ix), pos, dtype=np.int64) for pos, ix in enumerate(indices)])
    key = json.dumps([SURROGATE_VERSION, data.fingerprint(), [c.class_id for c in classes], arch, epochs,
                      per_class, seed, batch_size, lr])
    folder = cache_root(ctx.cache_dir) / "surrogates" / hashlib.sha256(key.encode()).hexdigest()[:16]
    trainer = _Trainer(arch, data, len(classes), epochs, seed, lr)
    checkpoints = [trainer.params()]  # the initialisation
    last = None
    for k in range(1, epochs + 1):  # the cached epochs, in order, as far as they go
        state = _load_epoch(folder / f"epoch-{k:03d}.pt", checkpoints[0])
        if state is None:
            break
        checkpoints.append({n: t.float() for n, t in state["params"].items()})
        last = state
    if last is not None and len(checkpoints) <= epochs and not trainer.restore(last):
        log.warning("IGD surrogate cache %s has no usable optimiser state; training from scratch", folder)
        trainer = _Trainer(arch, data, len(classes), epochs, seed, lr)
        checkpoints = checkpoints[:1]
    resumed = len(checkpoints) - 1
    t0 = time.perf_counter()
    if resumed < epochs:
        dataset = data.dataset(np.concatenate(indices))
        bar = tqdm(range(resumed + 1, epochs + 1), desc=f"IGD surrogate {arch}", unit="epoch",
                   disable=not ctx.progress, leave=False)
        for k in bar:
            loss = trainer.epoch(dataset, targets, batch_size)
            bar.set_postfix(loss=f"{loss:.4f}")
            log.info("IGD surrogate epoch %d/%d: train loss %.4f", k, epochs, loss)
            state = trainer.state()
            checkpoints.append(state["params"])
            cache_torch(state, folder / f"epoch-{k:03d}.pt")
    return Surrogate(trainer.model, checkpoints, time.perf_counter() - t0 if resumed < epochs else 0.0, resumed)


# --------------------------------------------------------------------------- the guidance


class InfluenceGuidance:
    """Step guidance: IGD's influence and deviation terms as classifier guidance (module docstring)."""

    def __init__(self, model, cond, labels: list[int], real: dict[int, list[Tensor]], surrogate: nn.Module,
                 checkpoints: list[dict[str, Tensor]], decode, memory: list[Tensor], rho: float, gamma: float,
                 low: int, high: int):
        self.model, self.cond, self.labels, self.real = model, cond, labels, real
        self.surrogate, self.checkpoints, self.decode, self.memory = surrogate, checkpoints, decode, memory
        self.rho, self.gamma, self.low, self.high = float(rho), float(gamma), int(low), int(high)

    def active(self, t: int) -> bool:
        return self.low <= t <= self.high and (self.rho != 0.0 or self.gamma != 0.0)

    def loss(self, x_t: Tensor, t: int, alpha_bar: float) -> Tensor:
        """ρ·L_I + γ·L_D summed over the batch, as a function of x_t (through the denoiser)."""
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        eps = self.model(x_t, tt, self.cond).eps.float()
        x0 = (x_t - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)
        total = x0.sum() * 0.0
        if self.rho != 0.0:
            images = self.decode(x0)  # (B, C, R, R)
            for j, label in enumerate(self.labels):
                pseudo = [cross_entropy_grad(self.surrogate, p, images[j:j + 1], label, create_graph=True)
                          for p in self.checkpoints]
                total = total + self.rho * influence_loss(pseudo, self.real[label])
        if self.gamma != 0.0:
            for j in range(len(self.labels)):
                total = total + self.gamma * deviation_loss(x0[j], self.memory[j].to(x0.device))
        return total

    def __call__(self, step: Step) -> Tensor:
        if not self.active(step.t):
            return step.mean
        with torch.enable_grad():
            x = step.x_t.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss(x, step.t, step.alpha_bar), x)
        if isinstance(step.sigma, Tensor) or step.sigma > 0:
            return step.mean - step.sigma ** 2 * grad  # condition_mean: μ + Σ·∇log p
        return step.mean_from_eps(step.eps + math.sqrt(1.0 - step.alpha_bar) * grad)  # condition_score


# --------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class IGDOptions:
    influence_scale: float = option(0.02, "IGD (DiT, LDM UNet, SD with a KL VAE): influence guidance scale ρ "
                                          "(released --gm-scale 0.02)")
    deviation_scale: float = option(0.01, "IGD: deviation (diversity) guidance scale γ (released --lambda-neg 0.01)")
    igd_low: int = option(500, "IGD: guide at training timesteps >= this (released --low 500)")
    igd_high: int = option(800, "IGD: ... and <= this (released --high 800)")
    grad_ipc: int = option(80, "IGD: real images per class whose gradients the influence term matches "
                               "(released --grad-ipc 80)")
    memory_size: int = option(64, "IGD: finished latents per class the deviation term looks at "
                                  "(released --memory-size 64)")
    surrogate: str = option("convnet-6", "IGD: surrogate network (released --net-type convnet6)", choices=SURROGATES)
    surrogate_epochs: int = option(50, "IGD: surrogate training epochs, one checkpoint each (released train_ckpt.sh 50)")
    surrogate_per_class: int = option(0, "IGD: real train images per class the surrogate trains on (0: all, "
                                         "as released)")
    checkpoint_threshold: float = option(0.7, "IGD: keep a surrogate epoch when its gradients' cosine to the last "
                                              "kept epoch's falls below this (released test_ckpts_grad_sim.py 0.7)")
    surrogate_seed: int = option(0, "IGD: seed of the surrogate's initialisation and batches")

    def __post_init__(self):
        check_finite("--influence-scale", self.influence_scale)
        check_finite("--deviation-scale", self.deviation_scale)
        if not 0 <= self.igd_low <= self.igd_high:
            raise Mgd3Error(f"--igd-low and --igd-high must satisfy 0 <= LOW <= HIGH, got {self.igd_low} "
                            f"and {self.igd_high}")
        check_at_least(("--grad-ipc", self.grad_ipc, 1), ("--memory-size", self.memory_size, 0),
                       ("--surrogate-epochs", self.surrogate_epochs, 1),
                       ("--surrogate-per-class", self.surrogate_per_class, 0))
        if not (math.isfinite(self.checkpoint_threshold) and -1.0 <= self.checkpoint_threshold <= 1.0):
            raise Mgd3Error(f"--checkpoint-threshold is a cosine, in [-1, 1]; got {self.checkpoint_threshold}")


@METHODS.register("igd")
class IGD(Method):
    name = "igd"
    Options = IGDOptions
    needs_cache = True  # the surrogate (minutes to hours of training) lives in the cache

    def __init__(self, options: IGDOptions | None = None):
        super().__init__(options or IGDOptions())
        self.memory: dict[int, Tensor] = {}
        self.info: dict = {}

    def validate(self, ctx):
        o = self.options
        b = ctx.backend
        if o.igd_high >= len(b.betas):
            raise Mgd3Error(f"--igd-high {o.igd_high} is past the model's last training timestep {len(b.betas) - 1}")
        if not getattr(b, "decodes_with_gradients", False):
            raise Mgd3Error(f"--method igd differentiates through the VAE decoder, which the {b.name} backend's "
                            "first stage cannot (a VQ first stage quantises)")
        ts = [int(t) for t in ctx.plan.timesteps]
        if not any(o.igd_low <= t <= o.igd_high for t in ts):
            log.warning("IGD: no sampling step falls in [%d, %d]; the run is plain sampling", o.igd_low, o.igd_high)

    @property
    def order_dependent(self) -> bool:
        return self.options.deviation_scale != 0.0 and self.options.memory_size > 0

    def prepare(self, ctx):
        o = self.options
        sur = train_surrogate(ctx, o.surrogate, o.surrogate_epochs, o.surrogate_per_class, o.surrogate_seed)
        t0 = time.perf_counter()
        grads: list[dict[int, Tensor]] = [{} for _ in sur.checkpoints]
        for pos, c in enumerate(ctx.all_classes):
            idx = ctx.data.indices(c.index)[:o.grad_ipc]
            ds = ctx.data.dataset(idx)
            images = torch.stack([ds[j][0] for j in range(len(idx))])
            for k, params in enumerate(sur.checkpoints):
                grads[k][pos] = real_gradient(sur.model, params, images, pos)
        kept = select_checkpoints(grads, o.checkpoint_threshold)
        self.surrogate = sur.model
        dev = ctx.backend.device
        self.surrogate.to(dev)
        self.checkpoints = [{n: t.to(dev) for n, t in sur.checkpoints[k].items()} for k in kept]
        self.real = {pos: [grads[k][pos].to(dev) for k in kept] for pos in range(len(ctx.all_classes))}
        self.position = {c.index: pos for pos, c in enumerate(ctx.all_classes)}
        self.memory = {c.index: torch.zeros(0, int(np.prod(ctx.backend.latent_shape))) for c in ctx.classes}
        self.info = {"training_free": False, "surrogate_trained": True,
                     "surrogate": {"network": o.surrogate, "epochs": o.surrogate_epochs,
                                   "images_per_class": o.surrogate_per_class or "all", "seed": o.surrogate_seed,
                                   "train_seconds": round(sur.seconds, 1), "epochs_from_cache": sur.resumed},
                     "checkpoints_kept": kept, "real_gradient_seconds": round(time.perf_counter() - t0, 1),
                     "guided_timesteps": [o.igd_low, o.igd_high],
                     "memory": "each class's last --memory-size finished latents, in generation order",
                     "step": "classifier guidance (guided-diffusion condition_mean / condition_score); "
                             "the released --repeat recurrence is not implemented"}
        log.info("IGD: surrogate %s, checkpoints kept %s of %d", o.surrogate, kept, len(sur.checkpoints))

    def influence_guidance(self, ctx, items) -> InfluenceGuidance:
        o = self.options
        b = ctx.backend
        labels = [self.position[it.cls.index] for it in items]
        memory = [self.memory[it.cls.index][-o.memory_size:] if o.memory_size else self.memory[it.cls.index][:0]
                  for it in items]
        return InfluenceGuidance(ctx.denoiser(), b.cond([it.cls.label for it in items]), labels, self.real,
                                 self.surrogate, self.checkpoints, b.decode_differentiable, memory,
                                 o.influence_scale, o.deviation_scale, o.igd_low, o.igd_high)

    def generate(self, ctx, items):
        latents = ctx.sample(items, guidance=[self.influence_guidance(ctx, items)])
        self.replay(ctx, items, latents)
        return Batch(latents, mode_ids=[None] * len(items))

    def replay(self, ctx, items, latents):
        for j, it in enumerate(items):
            mem = torch.cat([self.memory[it.cls.index], latents[j:j + 1].flatten(1).float().cpu()])
            self.memory[it.cls.index] = mem[-max(self.options.memory_size, 1):]

    def manifest_info(self):
        return self.info


# --------------------------------------------------------------------------- IGD + MGD³


def _mgd3_option(name: str, default):
    from mgd3.methods.mgd3 import MGD3Options

    return dataclasses.field(default=default, metadata=MGD3Options.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class IGDMGD3Options(IGDOptions):
    # MGD³'s own options, with its defaults and help (the CLI shows one help per flag)
    lam: float = _mgd3_option("lam", 0.1)
    t_stop: int | None = _mgd3_option("t_stop", None)
    modes: str = _mgd3_option("modes", "kmeans")
    mode_seed: int = _mgd3_option("mode_seed", 0)

    def __post_init__(self):
        super().__post_init__()
        check_finite("--lambda", self.lam)


@METHODS.register("igd-mgd3")
class IGDMGD3(IGD):
    """IGD's influence and deviation terms and MGD³'s mode and stop guidance on the same steps:
    image k of a class is pulled toward mode k (λ·σ_t·(m − x̂0), DDPM; the ε form for DDIM) while the
    step index > t_stop, and IGD's guidance is added after it. ρ = γ = 0 is `mgd3`, λ = 0 is `igd`."""

    name = "igd-mgd3"
    Options = IGDMGD3Options

    @classmethod
    def resolve_options(cls, options, sampler):
        if options.t_stop is None:
            return dataclasses.replace(options, t_stop=sampler.steps // 2)
        return options

    def validate(self, ctx):
        super().validate(ctx)
        from mgd3.core.mode_discovery import MODE_FINDERS

        steps = ctx.sampler.steps
        t_stop = self.resolve_options(self.options, ctx.sampler).t_stop
        if not -1 <= t_stop <= steps:
            raise Mgd3Error(f"--t-stop must be in -1..{steps} for {steps} steps, got {t_stop}")
        self.t_stop = t_stop
        MODE_FINDERS.get(self.options.modes)
        ctx.check_class_sizes()

    def prepare(self, ctx):
        from mgd3.core.mode_discovery import find_modes

        super().prepare(ctx)
        latents = ctx.real_latents()
        self.class_modes = {c.index: find_modes(self.options.modes, latents[c.index].numpy(), ctx.ipc,
                                                self.options.mode_seed) for c in ctx.classes}
        self.info["mode_guidance"] = {"lambda": self.options.lam, "t_stop": self.t_stop, "finder": self.options.modes,
                                      "random_state": self.options.mode_seed}

    def generate(self, ctx, items):
        from mgd3.core.guidance import ModeGuidance, StopWindow
        from mgd3.methods import as_tensor_modes

        shape = ctx.backend.latent_shape
        targets = torch.cat([as_tensor_modes(self.class_modes[it.cls.index].points[it.index], shape)
                             for it in items]).to(ctx.backend.device)  # (B, C, h, w)
        modes = StopWindow(ModeGuidance(targets, self.options.lam), self.t_stop)
        latents = ctx.sample(items, guidance=[modes, self.influence_guidance(ctx, items)])
        self.replay(ctx, items, latents)
        return Batch(latents, mode_ids=[it.index for it in items])
