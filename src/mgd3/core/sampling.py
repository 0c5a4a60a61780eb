"""Stage: the guided sampler. One loop, two update rules, guidance as callables.

- DDPM ancestral sampling (Ho et al., 2020) on a respaced schedule, with fixed (posterior)
  or learned-range variance (Nichol & Dhariwal, 2021; the DiT code).
- DDIM (Song et al., 2021), eta = 0 by default.

Notation (per respaced step i = S-1 ... 0, training timestep t = timesteps[i]):
    alpha_bar        ᾱ_t                    alpha_bar_prev   ᾱ of the next (less noisy) step, 1 at the end
    beta             1 - ᾱ_t / ᾱ_prev       (the respaced beta)
    eps              ε̃ (after classifier-free guidance)
    x0               x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̃) / sqrt(ᾱ_t)
    mean             the update before noise: μ_θ(x_t, ε̃) for DDPM, the deterministic DDIM part
    sigma            std of the noise the step adds (0 at the last step, 0 for DDIM with eta = 0)

The sampler never imports a method or a guidance: guidance callables take the `Step` and
return a corrected `mean`; observers take the `Step` and return nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.registry import Registry


@dataclass
class ModelOutput:
    """What a denoiser returns: ε and, for learned-range models, the variance values."""

    eps: Tensor  # (B, C, H, W)
    var_values: Tensor | None = None  # (B, C, H, W) in [-1, 1], or None for fixed variance


class Denoiser(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> ModelOutput: ...


# --------------------------------------------------------------------------- schedule


def respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced training timesteps, as the DiT/ADM `space_timesteps(T, "S")`.

    round(k * (T - 1) / (S - 1)) for k = 0 .. S-1, ascending (50 of 1000: 0, 20, 41, ..., 999).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise Mgd3Error(f"--steps must be in 1..{num_train_timesteps}, got {steps}")
    if steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (steps - 1)
    out, cur = [], 0.0
    for _ in range(steps):
        out.append(round(cur))
        cur += stride
    return out


@dataclass(frozen=True)
class Plan:
    """Per-respaced-step coefficients (float64), index i = 0 (cleanest) ... S-1 (noisiest)."""

    timesteps: np.ndarray  # (S,) int64, training timesteps
    alpha_bar: np.ndarray  # (S,)
    alpha_bar_prev: np.ndarray  # (S,)
    betas: np.ndarray  # (S,) respaced betas
    posterior_variance: np.ndarray  # (S,)
    posterior_log_variance_clipped: np.ndarray  # (S,)
    coef_x0: np.ndarray  # (S,) posterior mean coefficient of x0
    coef_xt: np.ndarray  # (S,) posterior mean coefficient of x_t

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_betas(cls, train_betas: np.ndarray | Tensor, steps: int) -> "Plan":
        """The plan of `steps` steps respaced as DiT's `space_timesteps` (see `respaced_timesteps`)."""
        return cls.from_timesteps(train_betas, respaced_timesteps(len(train_betas), steps))

    @classmethod
    def from_timesteps(cls, train_betas: np.ndarray | Tensor, timesteps: Sequence[int]) -> "Plan":
        """The plan that visits these training timesteps (any order given; run noisiest first) and
        steps from each to the next lower one, ᾱ_prev = 1 after the lowest (a diffusers scheduler's
        `timesteps` with its spacing, for example)."""
        train_betas = np.asarray(train_betas, dtype=np.float64)
        abar_train = np.cumprod(1.0 - train_betas)
        ts = np.unique(np.asarray([int(t) for t in timesteps], dtype=np.int64))  # ascending
        if len(ts) != len(timesteps) or len(ts) == 0 or ts[0] < 0 or ts[-1] >= len(train_betas):
            raise Mgd3Error(f"timesteps must be distinct and in 0..{len(train_betas) - 1}")
        steps = len(ts)
        abar = abar_train[ts]
        abar_prev = np.append(1.0, abar[:-1])
        betas = 1.0 - abar / abar_prev
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # log of the posterior variance, clipped because it is 0 at the first step
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if steps > 1 else np.log(betas)
        coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
        return cls(ts, abar, abar_prev, betas, post_var, post_log_var, coef_x0, coef_xt)

    def q_sample(self, x0: Tensor, index: int, noise: Tensor) -> Tensor:
        """Noise a clean latent to respaced step `index` (img2img start)."""
        a = float(self.alpha_bar[index])
        return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise


# --------------------------------------------------------------------------- step state


@dataclass
class Step:
    """The state of one sampling step, handed to guidance callables and observers."""

    index: int  # respaced index i, S-1 ... 0
    t: int  # training timestep
    x_t: Tensor  # (B, C, H, W)
    eps: Tensor  # (B, C, H, W) after CFG
    x0: Tensor  # (B, C, H, W) predicted clean latent
    alpha_bar: float
    alpha_bar_prev: float
    sigma: Tensor | float  # std of the noise this step adds
    mean: Tensor  # (B, C, H, W) the update before noise (guidance corrects it)
    guidance_form: str  # the update rule's own guidance form ("ddpm" or "ddim"; see UpdateRule)
    mean_from_eps: Callable[[Tensor], Tensor] = field(repr=False)  # the update for another ε

    def eps_from_x0(self, x0: Tensor) -> Tensor:
        """The ε that makes `x0` the prediction at this step."""
        return (self.x_t - math.sqrt(self.alpha_bar) * x0) / math.sqrt(1.0 - self.alpha_bar)


Guidance = Callable[[Step], Tensor]
Observer = Callable[[Step], None]


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar: float) -> Tensor:
    return (x_t - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)


# --------------------------------------------------------------------------- update rules


@dataclass(frozen=True)
class UpdateRule:
    """An update rule (plan, i, x_t, model output[, eta]) -> (mean, sigma, mean_from_eps) and
    what guidance needs to know about it.

    guidance_form: the form mode guidance takes with this rule when the user asks for "auto":
    "ddpm" for a rule that adds noise σ_t > 0 at every step but the last (guidance λ·σ_t·g is
    added to the mean, as the official code), "ddim" for a rule whose guidance goes through ε
    (paper Eq. 6; with η = 0 it adds no noise, so a σ_t-scaled guidance would do nothing).
    """

    update: Callable[..., tuple[Tensor, "Tensor | float", Callable[[Tensor], Tensor]]]
    guidance_form: str
    takes_eta: bool = False

    def __call__(self, plan: "Plan", i: int, x_t: Tensor, out: ModelOutput, eta: float = 0.0):
        if self.takes_eta:
            return self.update(plan, i, x_t, out, eta)
        return self.update(plan, i, x_t, out)


UPDATE_RULES: Registry[UpdateRule] = Registry("sampler")


def ddpm_update(plan: Plan, i: int, x_t: Tensor, out: ModelOutput):
    """Posterior mean μ = c0·x̂0 + ct·x_t and std σ (fixed posterior, or learned range)."""
    a = float(plan.alpha_bar[i])
    c0, ct = float(plan.coef_x0[i]), float(plan.coef_xt[i])

    def mean_from_eps(eps: Tensor) -> Tensor:
        return c0 * predict_x0(x_t, eps, a) + ct * x_t

    if i == 0:
        sigma: Tensor | float = 0.0  # no noise at the last step
    elif out.var_values is not None:
        # learned range: interpolate log variance between the posterior's and beta's
        frac = (out.var_values.float() + 1.0) / 2.0
        min_log = float(plan.posterior_log_variance_clipped[i])
        max_log = math.log(float(plan.betas[i]))
        sigma = torch.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
    else:
        sigma = math.exp(0.5 * float(plan.posterior_log_variance_clipped[i]))
    return mean_from_eps(out.eps), sigma, mean_from_eps


def ddim_update(plan: Plan, i: int, x_t: Tensor, out: ModelOutput, eta: float = 0.0):
    """x_{t-1} = sqrt(ᾱ_prev)·x̂0 + sqrt(1 - ᾱ_prev - σ²)·ε (+ σ·z), σ = 0 when eta = 0."""
    a, a_prev = float(plan.alpha_bar[i]), float(plan.alpha_bar_prev[i])
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
    c_eps = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0))

    def mean_from_eps(eps: Tensor) -> Tensor:
        return math.sqrt(a_prev) * predict_x0(x_t, eps, a) + c_eps * eps

    return mean_from_eps(out.eps), sigma, mean_from_eps


UPDATE_RULES.add("ddpm", UpdateRule(ddpm_update, guidance_form="ddpm"))
UPDATE_RULES.add("ddim", UpdateRule(ddim_update, guidance_form="ddim", takes_eta=True))


# --------------------------------------------------------------------------- CFG wrapper


def noise_levels(train_betas: np.ndarray | Tensor) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) of every training timestep t (float64): a VP model's noise level
    in the EDM sense (x_t / sqrt(ᾱ_t) = x0 + σ_t·ε), the unit of `--cfg-interval`."""
    abar = np.cumprod(1.0 - np.asarray(train_betas, dtype=np.float64))
    return np.sqrt((1.0 - abar) / abar)


def check_cfg_interval(interval, name: str = "--cfg-interval") -> tuple[float, float] | None:
    """A CFG interval (LOW, HIGH) of noise levels: two finite numbers, 0 <= LOW < HIGH; None: off."""
    if interval is None:
        return None
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise Mgd3Error(f"{name} takes two noise levels LOW HIGH, got {str(interval)[:60]}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
        raise Mgd3Error(f"{name} needs two finite noise levels >= 0, got {low:g} {high:g}")
    if low >= high:
        raise Mgd3Error(f"{name}: LOW must be below HIGH, got {low:g} {high:g}")
    return low, high


def cfg_interval_timesteps(train_betas: np.ndarray | Tensor, timesteps: Sequence[int],
                           interval: tuple[float, float]) -> list[int]:
    """The training timesteps among `timesteps` whose noise level is in (LOW, HIGH]: where CFG applies."""
    sigmas = noise_levels(train_betas)
    low, high = interval
    return [int(t) for t in timesteps if low < sigmas[int(t)] <= high]


class CFGDenoiser:
    """Classifier-free guidance as a model wrapper: ε̃ = ε_u + s·(ε_c - ε_u).

    `channels` limits CFG to the first channels (the original DiT code guides 3 of 4 latent
    channels; the rest keep the conditional ε). The variance values come from the conditional
    half, as in the DiT code. Scale 1 calls the inner model once, unguided.

    `interval` (LOW, HIGH) limits CFG to the noise levels σ_t in (LOW, HIGH] (Kynkäänniemi et al.,
    NeurIPS 2024), σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) from `sigmas` (`noise_levels` of the training
    betas, indexed by training timestep); elsewhere it is scale 1: one unguided call, no
    unconditional forward. None: CFG at every step.
    """

    def __init__(self, model: Denoiser, scale: float, uncond: Tensor, channels: int | None = None,
                 interval: tuple[float, float] | None = None, sigmas: np.ndarray | None = None):
        self.model, self.scale, self.uncond, self.channels = model, float(scale), uncond, channels
        self.interval = check_cfg_interval(interval)
        if self.interval is not None and sigmas is None:
            raise ValueError("a CFG interval needs the noise levels of the training timesteps")
        self.sigmas = sigmas

    def guided(self, t: Tensor) -> Tensor:
        """(B,) bool: the items whose timestep gets CFG (every one without an interval)."""
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool)
        low, high = self.interval
        s = self.sigmas[t.cpu().numpy()]
        return torch.from_numpy((low < s) & (s <= high))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor) -> ModelOutput:
        if self.scale == 1.0:
            return self.model(x_t, t, cond)
        if self.interval is None:
            return self._cfg(x_t, t, cond)
        on = self.guided(t)
        if bool(on.all()):
            return self._cfg(x_t, t, cond)
        plain = self.model(x_t, t, cond)
        if not bool(on.any()):
            return plain
        # timesteps on both sides of the interval in one batch (the sampler never makes one): each item its own
        g = self._cfg(x_t, t, cond)
        m = on.to(x_t.device).view(-1, *([1] * (x_t.dim() - 1)))
        var = None if plain.var_values is None else torch.where(m, g.var_values, plain.var_values)
        return ModelOutput(torch.where(m, g.eps, plain.eps), var)

    def _cfg(self, x_t: Tensor, t: Tensor, cond: Tensor) -> ModelOutput:
        b = x_t.shape[0]
        uncond = self.uncond.expand(b, *self.uncond.shape[1:]).to(cond.device)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        eps_c, eps_u = out.eps.chunk(2)  # (B, C, H, W) each
        n = eps_c.shape[1] if self.channels is None else self.channels
        guided = eps_u[:, :n] + self.scale * (eps_c[:, :n] - eps_u[:, :n])
        eps = torch.cat([guided, eps_c[:, n:]], dim=1)
        var = None if out.var_values is None else out.var_values[:b]
        return ModelOutput(eps, var)


# --------------------------------------------------------------------------- the loop

# What one generator per item guarantees, as measured (benchmarks/results/batch_invariance.md,
# tests/test_batch_invariance.py); every manifest quotes it.
REPRODUCIBILITY = {
    "processes": "bit-identical: a torchrun launch of N processes writes the set one process writes "
                 "with the same --batch-size and the same torch threads per process (torchrun starts each "
                 "process at 1 thread, a single process uses every core: give it --threads 1)",
    "threads": "CPU matrix products round differently at another thread count: latents may differ in the "
               "last float bits (measured 5e-7 relative, 1 vs 2 threads, 10 steps) and a PNG by 1 gray level "
               "in rare pixels (1 pixel of 20 images)",
    "batch_size": "every image gets the same noise at any --batch-size, but batched matrix products round "
                  "differently: latents may differ in the last float bits (measured up to 3e-5 relative "
                  "after 50 steps) and a PNG by at most 1 gray level in rare pixels",
}


def randn_per_item(generators: Sequence[torch.Generator], shape: tuple[int, ...], device) -> Tensor:
    """One normal draw per item from its own generator: results never depend on batching."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample(
    model: Denoiser,
    x: Tensor,
    plan: Plan,
    cond: Any,
    generators: Sequence[torch.Generator],
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    guidance: Sequence[Guidance] = (),
    observers: Sequence[Observer] = (),
    start_index: int | None = None,
) -> Tensor:
    """Run the reverse process from `x` (at respaced step `start_index`, default the noisiest).

    x: (B, C, H, W) latents at step start_index; generators: one per item, used for every noise
    draw of that item. Returns the final latents x_0, (B, C, H, W).
    """
    rule = UPDATE_RULES.get(sampler)
    if len(generators) != x.shape[0]:
        raise ValueError("one generator per item is required")
    start = plan.steps - 1 if start_index is None else start_index
    for i in range(start, -1, -1):
        t = int(plan.timesteps[i])
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = model(x, t_batch, cond)
        out = ModelOutput(out.eps.float(), out.var_values)
        a = float(plan.alpha_bar[i])
        mean, sigma, mean_from_eps = rule(plan, i, x, out, eta)
        step = Step(i, t, x, out.eps, predict_x0(x, out.eps, a), a, float(plan.alpha_bar_prev[i]),
                    sigma, mean, rule.guidance_form, mean_from_eps)
        for g in guidance:
            step.mean = g(step)
        for obs in observers:
            obs(step)
        needs_noise = isinstance(sigma, Tensor) or sigma > 0.0
        if needs_noise:
            x = step.mean + sigma * randn_per_item(generators, tuple(x.shape[1:]), x.device)
        else:
            x = step.mean
    return x
