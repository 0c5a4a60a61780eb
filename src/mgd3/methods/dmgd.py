"""Method `dmgd`: DMGD, train-free semantic + distribution matching guidance
(Wang et al., CVPR 2026, arXiv 2605.03877), on the shared sampler.

- Semantic matching (a model wrapper): every label embedding e(y) of the DiT, in both CFG
  branches, becomes  sqrt(λ_t)·e(y) + 0.06·sqrt(1-λ_t)·u + 0.01·sqrt(1-λ_t)·e(y*),  u ~ U(0, 1),
  y* a random other class of the subset, rescaled to the mean/std of e(y); λ_t = 0 for t > 900,
  (900 - t)/400 for 500 <= t <= 900, 1 for t < 500 (training timesteps).
- Distribution matching (a step guidance): per class K = 10 k-means centroids of the real latents
  with masses = cluster sizes / N. At guided steps (respaced index in [30, 45]) the batch's x̂0 of
  a class and the class's already finished latents (greedy progressive memory) are L2-normalised;
  C = their distances to the normalised centroids, P = 5 Sinkhorn iterations (ε = 0.1, uniform
  source, target masses), L = Σ P ⊙ C; the gradient reaches x_t through x̂0 only (ε detached,
  P held fixed); the update is μ ← μ - ρ·σ_t·∇L (DDPM), or ε ← ε + sqrt(1 - ᾱ)·ρ·∇L (DDIM).

With neither --semantic nor --distribution given, both terms are on. Because of the progressive
memory, an image depends on the images of its class generated before it (generation order is
fixed: class-major, batch by batch).
"""

from __future__ import annotations

import dataclasses

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.methods import METHODS, Batch, Method, check_finite, class_modes_progress, option
from mgd3.core.mode_discovery import find_modes
from mgd3.core.sampling import ModelOutput, Step


def semantic_lambda(t: int) -> float:
    if t > 900:
        return 0.0
    if t >= 500:
        return (900 - t) / 400
    return 1.0


def sinkhorn(cost: Tensor, a: Tensor, b: Tensor, iters: int = 5, eps: float = 0.1) -> Tensor:
    """Entropic OT plan (log domain) between masses a (n,) and b (K,) for cost (n, K)."""
    log_a, log_b = a.log(), b.log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        f = eps * (log_a - torch.logsumexp((g[None, :] - cost) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f[:, None] - cost) / eps, dim=0))
    return torch.exp((f[:, None] + g[None, :] - cost) / eps)


class SemanticMatching:
    """Model wrapper: mixes every label embedding as DMGD's semantic matching."""

    def __init__(self, inner, embedders, y_star: Tensor, generators, noise_scale=0.06, mix_scale=0.01):
        self.inner, self.embedders, self.y_star = inner, embedders, y_star
        self.generators, self.noise_scale, self.mix_scale = generators, noise_scale, mix_scale
        self._lam = 1.0
        self._u: Tensor | None = None

    def __call__(self, x_t: Tensor, t: Tensor, cond) -> ModelOutput:
        self._lam = semantic_lambda(int(t[0]))
        if self._lam == 1.0:
            return self.inner(x_t, t, cond)
        handles = [m.register_forward_hook(self._hook) for m in self.embedders]
        self._u = None
        try:
            return self.inner(x_t, t, cond)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, module, inputs, e: Tensor) -> Tensor:
        b = len(self.y_star)
        reps = e.shape[0] // b  # 2 with CFG: the same mixing in both branches
        if self._u is None or self._u.shape[-1] != e.shape[-1]:
            self._u = torch.stack([torch.rand(e.shape[-1], generator=g) for g in self.generators]).to(e.device)
        u = self._u.repeat(reps, 1)  # (N, D)
        e_star = module.embedding_table(self.y_star.to(e.device).repeat(reps))  # (N, D)
        s = math.sqrt(1.0 - self._lam)
        mixed = math.sqrt(self._lam) * e + self.noise_scale * s * u + self.mix_scale * s * e_star
        mixed = (mixed - mixed.mean(-1, keepdim=True)) / (mixed.std(-1, keepdim=True) + 1e-8)
        return mixed * e.std(-1, keepdim=True) + e.mean(-1, keepdim=True)


class OTDistributionMatching:
    """Step guidance: optimal-transport distribution matching toward the class centroids."""

    def __init__(self, groups, centroids, masses, memory, rho, start, stop, iters, eps):
        self.groups = groups  # [(class index, item positions in the batch)]
        self.centroids, self.masses, self.memory = centroids, masses, memory
        self.rho, self.start, self.stop, self.iters, self.eps = rho, start, stop, iters, eps

    def __call__(self, step: Step) -> Tensor:
        if not (self.stop <= step.index <= self.start) or self.rho == 0:
            return step.mean
        with torch.enable_grad():
            x0 = step.x0.detach().requires_grad_(True)
            loss = x0.new_zeros(())
            for c, pos in self.groups:
                pts = x0[pos].flatten(1)
                if len(self.memory[c]):
                    pts = torch.cat([pts, self.memory[c].to(pts.device)])
                pts = torch.nn.functional.normalize(pts, dim=1)
                cen = torch.nn.functional.normalize(self.centroids[c].to(pts.device), dim=1)
                cost = torch.cdist(pts, cen)  # (n, K)
                a = torch.full((len(pts),), 1.0 / len(pts), device=pts.device)
                transport = sinkhorn(cost.detach(), a, self.masses[c].to(pts.device), self.iters, self.eps)
                loss = loss + (transport * cost).sum()
            (grad_x0,) = torch.autograd.grad(loss, x0)
        grad = grad_x0 / math.sqrt(step.alpha_bar)  # ∂x̂0/∂x_t = 1/sqrt(ᾱ) with ε held fixed
        if isinstance(step.sigma, Tensor) or step.sigma > 0:
            return step.mean - self.rho * step.sigma * grad
        return step.mean_from_eps(step.eps + math.sqrt(1.0 - step.alpha_bar) * self.rho * grad)


@dataclass(frozen=True)
class DMGDOptions:
    semantic: bool = option(False, "semantic matching term (with neither --semantic nor "
                                   "--distribution, both terms are on)")
    distribution: bool = option(False, "OT distribution matching term")
    rho: float = option(0.5, "distribution matching step ρ (paper default 0.5)")
    ot_clusters: int = option(10, "k-means centroids per class for OT (K)")
    dm_start: int = option(45, "distribution matching from this respaced step index ...")
    dm_stop: int = option(30, "... down to this one (inclusive)")
    sinkhorn_iters: int = option(5, "Sinkhorn iterations")
    sinkhorn_eps: float = option(0.1, "Sinkhorn entropic regularisation ε")
    mode_seed: int = option(0, "random_state of the clustering (official: 0)")


@METHODS.register("dmgd")
class DMGD(Method):
    name = "dmgd"
    Options = DMGDOptions

    def __init__(self, options=None):
        super().__init__(self.resolve_options(options or DMGDOptions(), None))

    @classmethod
    def resolve_options(cls, options: DMGDOptions, sampler) -> DMGDOptions:
        """With neither term asked for, both are on."""
        if not options.semantic and not options.distribution:
            return dataclasses.replace(options, semantic=True, distribution=True)
        return options

    def validate(self, ctx):
        o = self.options
        check_finite("--rho", o.rho)
        check_finite("--sinkhorn-eps", o.sinkhorn_eps, minimum=1e-6)
        if o.ot_clusters < 1 or o.sinkhorn_iters < 1:
            raise Mgd3Error("--ot-clusters and --sinkhorn-iters must be at least 1")
        if o.semantic and not ctx.backend.label_embedders():
            raise Mgd3Error(f"--semantic needs a model with class-label embeddings ({ctx.backend.name} has none)")
        if o.semantic and len(ctx.all_classes) < 2:
            raise Mgd3Error("--semantic mixes in another class of the subset: distill at least 2 classes")

    def prepare(self, ctx):
        o = self.options
        self.centroids, self.masses, self.memory = {}, {}, {}
        if not o.distribution:
            return
        latents = ctx.real_latents()
        for c in class_modes_progress(ctx, "OT centroids"):
            x = latents[c.index]  # (N, C, h, w)
            k = min(o.ot_clusters, len(x))
            m = find_modes("kmeans", x.numpy(), k, o.mode_seed)
            sizes = np.bincount(m.assignment, minlength=k).astype(np.float32)
            self.centroids[c.index] = torch.from_numpy(m.points)
            self.masses[c.index] = torch.from_numpy(sizes / sizes.sum())
            self.memory[c.index] = torch.zeros(0, m.points.shape[1])

    def generate(self, ctx, items):
        o = self.options
        guidance, wrap = [], None
        if o.distribution:
            groups: dict[int, list[int]] = {}
            for j, it in enumerate(items):
                groups.setdefault(it.cls.index, []).append(j)
            guidance.append(OTDistributionMatching(list(groups.items()), self.centroids, self.masses, self.memory,
                                                   o.rho, o.dm_start, o.dm_stop, o.sinkhorn_iters, o.sinkhorn_eps))
        if o.semantic:
            aux = [torch.Generator().manual_seed(int(hashlib.sha256(f"dmgd/{it.seed}".encode()).hexdigest()[:15], 16))
                   for it in items]
            labels = [c.label for c in ctx.all_classes]  # every class of the run, whichever process
            y_star = []
            for it, g in zip(items, aux):
                others = [y for y in labels if y != it.cls.label]
                y_star.append(others[int(torch.randint(len(others), (1,), generator=g))])
            y_star = torch.tensor(y_star, dtype=torch.long)
            embedders = ctx.backend.label_embedders()

            def wrap(inner, embedders=embedders, y_star=y_star, aux=aux):
                return SemanticMatching(inner, embedders, y_star, aux)

        latents = ctx.sample(items, guidance=guidance, wrap=wrap)
        self.replay(ctx, items, latents)
        return Batch(latents, mode_ids=[None] * len(items))

    @property
    def order_dependent(self) -> bool:
        return self.options.distribution  # the progressive memory

    def replay(self, ctx, items, latents):
        if self.options.distribution:
            for j, it in enumerate(items):
                self.memory[it.cls.index] = torch.cat([self.memory[it.cls.index], latents[j:j + 1].flatten(1).cpu()])

    def manifest_info(self):
        return {"terms": {"semantic": self.options.semantic, "distribution": self.options.distribution},
                "memory": "greedy progressive: each class's finished latents, in generation order"}
