"""Method `coda`: CoDA, core distribution alignment (Zhou et al., "CoDA: From Text-to-Image Diffusion
Models to Training-Free Dataset Distillation", ICLR 2026; released code github.com/zzzlt422/CoDA,
`CoDA_main.py`, `postprocess.py`, `CoDA_SDXLBasePipeline.py`).

- Core samples (k = IPC real latents per class), two variants (--coda-modes):
  umap-hdbscan (the released code): StandardScaler, UMAP to 50 dimensions (n_neighbors 85,
  min_dist 0, random_state 42), HDBSCAN (min_cluster_size 55, min_samples 3), then the released
  post-processing to exactly k clusters (the k largest; or splitting the largest clusters by
  sub-HDBSCAN-seeded 2-means; or k-means on the points HDBSCAN left as noise), each represented
  by a real latent (`mgd3.core.mode_discovery.core_samples`). pooled-kmeans (an independent reproduction's
  variant, better there: 39.0 vs 35.0 on ImageWoof IPC 10): k-means on latents average-pooled to
  min(8, size)², mode = the real latent nearest each centroid.
- Guidance inside classifier-free guidance, on the conditional branch only: x̂0_c from the
  conditional ε, Δε_c = −(sqrt(ᾱ_t)/sqrt(1 − ᾱ_t))·γ·f_t·(s − x̂0_c), i.e. Δx̂0_c = γ·f_t·(s − x̂0_c),
  then CFG (so the change is scaled by the CFG weight). f_t = σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) (the
  released code: the DPM-Solver scheduler's sigma; Δε_c = −γ·(s − x̂0_c)) with --coda-sigma-scale on,
  f_t = 1 (the paper's Δẑ0 = γ(s − ẑ0)) with off.
- While the step's training timestep > the timestep at position int(S·--guide-fraction) of the
  S steps, noisiest first (released default 0.9: the first 90 % of the steps).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.methods import (METHODS, Batch, Method, as_tensor_modes, check_at_least, check_finite, class_modes_progress,
                          option)
from mgd3.core.mode_discovery import ClassModes, coda_umap_hdbscan_modes, pooled_kmeans_modes
from mgd3.core.sampling import ModelOutput

CODA_MODES = ("umap-hdbscan", "pooled-kmeans")


def guided_until(timesteps_noisiest_first: list[int], fraction: float) -> int:
    """The released stop: guidance while t > this training timestep."""
    stop_idx = min(int(len(timesteps_noisiest_first) * fraction), len(timesteps_noisiest_first) - 1)
    return int(timesteps_noisiest_first[stop_idx])


class CoDAGuidance:
    """Model wrapper (inside CFG): the conditional branch's ε pulled toward the core samples.
    The first B rows of a call are the conditional branch (`CFGDenoiser` puts it first)."""

    def __init__(self, inner, samples: Tensor, gamma: float, alphas_cumprod: np.ndarray, stop_t: int,
                 sigma_scale: bool = True):
        self.inner, self.samples, self.gamma = inner, samples, float(gamma)
        self.alphas_cumprod, self.stop_t, self.sigma_scale = alphas_cumprod, stop_t, sigma_scale

    def __call__(self, x_t: Tensor, t: Tensor, cond) -> ModelOutput:
        out = self.inner(x_t, t, cond)
        step_t = int(t[0])
        if self.gamma == 0.0 or step_t <= self.stop_t:
            return out
        b = len(self.samples)
        a = float(self.alphas_cumprod[step_t])
        eps = out.eps.float()
        eps_c = eps[:b]  # (B, C, h, w) the conditional branch
        x0_c = (x_t[:b].float() - math.sqrt(1.0 - a) * eps_c) / math.sqrt(a)
        f = math.sqrt((1.0 - a) / a) if self.sigma_scale else 1.0
        delta = -(math.sqrt(a) / math.sqrt(1.0 - a)) * (self.samples - x0_c) * self.gamma * f
        return ModelOutput(torch.cat([eps_c + delta, eps[b:]]), out.var_values)


@dataclass(frozen=True)
class CoDAOptions:
    coda_modes: str = option("umap-hdbscan", "CoDA (every backend: DiT, LDM UNet, SD) core samples: umap-hdbscan (the released code; needs "
                                             "umap-learn) or pooled-kmeans (k-means on 8×8-pooled latents)",
                             choices=CODA_MODES)
    coda_guidance_scale: float = option(0.05, "CoDA: guidance scale γ (released script 0.05)")
    coda_sigma_scale: str = option("on", "CoDA: on = the released code's extra σ_t = sqrt((1-ᾱ)/ᾱ) factor "
                                         "(Δε = -γ(s - x̂0)); off = the paper's Δx̂0 = γ(s - x̂0)",
                                   choices=("on", "off"))
    guide_fraction: float = option(0.9, "CoDA: guide the first int(steps × fraction) steps (released "
                                         "--guideTPercent 0.9)")
    umap_neighbors: int = option(85, "CoDA umap-hdbscan: UMAP n_neighbors (released script 85; clipped to "
                                     "the class size - 1)")
    umap_components: int = option(50, "CoDA umap-hdbscan: UMAP dimensions (released 50)")
    min_cluster_size: int = option(55, "CoDA umap-hdbscan: HDBSCAN min_cluster_size (released script 55)")
    min_samples: int = option(3, "CoDA umap-hdbscan: HDBSCAN min_samples (released 3)")
    pool_size: int = option(8, "CoDA pooled-kmeans: pool latents to min(pool, size)² before k-means")
    coda_seed: int = option(0, "CoDA: random_state of pooled-kmeans (the released UMAP uses 42 always)")

    def __post_init__(self):
        check_finite("--coda-guidance-scale", self.coda_guidance_scale)
        if not 0.0 <= self.guide_fraction <= 1.0 or not math.isfinite(self.guide_fraction):
            raise Mgd3Error(f"--guide-fraction must be in [0, 1], got {self.guide_fraction}")
        check_at_least(("--umap-neighbors", self.umap_neighbors, 2), ("--umap-components", self.umap_components, 1),
                       ("--min-cluster-size", self.min_cluster_size, 2), ("--min-samples", self.min_samples, 1),
                       ("--pool-size", self.pool_size, 1))


@METHODS.register("coda")
class CoDA(Method):
    name = "coda"
    Options = CoDAOptions

    def __init__(self, options: CoDAOptions | None = None):
        super().__init__(options or CoDAOptions())
        self.class_modes: dict[int, ClassModes] = {}
        self.stop_t = -1

    def validate(self, ctx):
        if self.options.coda_modes == "umap-hdbscan" and importlib.util.find_spec("umap") is None:
            raise Mgd3Error("--coda-modes umap-hdbscan needs umap-learn (pip install umap-learn); "
                            "--coda-modes pooled-kmeans does not")
        noisiest_first = [int(t) for t in ctx.plan.timesteps[::-1]]
        self.stop_t = guided_until(noisiest_first, self.options.guide_fraction)
        ctx.check_class_sizes()

    def prepare(self, ctx):
        o = self.options
        latents = ctx.real_latents()
        shape = tuple(ctx.backend.latent_shape)
        for c in class_modes_progress(ctx, f"CoDA {o.coda_modes}"):
            x = np.ascontiguousarray(latents[c.index].numpy().reshape(len(latents[c.index]), -1), dtype=np.float32)
            if o.coda_modes == "pooled-kmeans":
                self.class_modes[c.index] = pooled_kmeans_modes(x, shape, ctx.ipc, o.coda_seed, o.pool_size)
            else:
                self.class_modes[c.index] = coda_umap_hdbscan_modes(x, ctx.ipc, n_neighbors=o.umap_neighbors,
                                                              components=o.umap_components,
                                                              min_cluster_size=o.min_cluster_size,
                                                              min_samples=o.min_samples)

    def generate(self, ctx, items):
        o = self.options
        shape = ctx.backend.latent_shape
        samples = torch.cat([as_tensor_modes(self.class_modes[it.cls.index].points[it.index], shape)
                             for it in items]).to(ctx.backend.device)  # (B, C, h, w)
        acp = np.cumprod(1.0 - np.asarray(ctx.backend.betas, dtype=np.float64))

        def wrap(inner):
            return CoDAGuidance(inner, samples, o.coda_guidance_scale, acp, self.stop_t, o.coda_sigma_scale == "on")

        return Batch(ctx.sample(items, wrap=wrap), mode_ids=[it.index for it in items])

    def manifest_info(self):
        o = self.options
        return {"guided_while_timestep_above": self.stop_t, "sigma_scale": o.coda_sigma_scale,
                "core_samples": {"finder": o.coda_modes, "k": "ipc",
                                 "per_class": {str(c): m.info for c, m in self.class_modes.items()}}}
