"""Method `manifoldgd`: ManifoldGD, hierarchical modes + manifold guidance (Roy et al., "ManifoldGD:
Training-Free Hierarchical Manifold Guidance for Diffusion-Based Dataset Distillation", CVPR 2026;
released code github.com/AyushRoy2001/ManifoldGD, `sample_new.py` and
`diffusion/gaussian_diffusion.py`).

What the released code does, and so what this method does (the paper's abstract describes the
second term as "the mode-alignment vector projected onto the local tangent space"; the code
computes it as below, and the equivalence test holds mgd3 to the code):

- Modes: the k = IPC leaves of a divisive (bisecting) k-means tree of the class's VAE latents,
  largest-SSE leaf split first (`mgd3.core.mode_discovery.divisive_tree`), their means ordered level by level
  from --divisive-level (`pick_by_levels`); the tree's random_state is the run's --seed.
- Mode guidance, as MGD³ (official DDPM: μ + λ·σ_t·(m − x̂0); DDIM: x̂0 + λ·(m − x̂0)).
- Manifold guidance, per item and step: a cloud of --manifold-points points around the mode m
  (m + r_j·u_j, u_j uniform on the sphere, r_j half evenly spaced in [0.1, r], half uniform in
  [0, r]) noised to the step (sqrt(ᾱ)·p + sqrt(1 − ᾱ)·z); the --neighbors points of the cloud
  nearest x_t, their mean μ and top --tangent-dim principal directions U (the tangent plane);
  the term is η·tanh(d_min / --density-bandwidth)·v/‖v‖ with v = −(I − UUᵀ)(x_t − μ), the pull
  of x_t back onto the plane, added to the mean (DDPM) or to x̂0 (DDIM). The radius r starts at
  --radius-max-mult × --manifold-radius and shrinks to it over the first --radius-warm-steps
  guided steps (--radius-schedule).
- Both terms while the step index > --t-stop (released scripts: 25 of 50; the abstract's
  "every denoising timestep" is --t-stop -1).

The cloud's random draws come from a generator per item seeded from the item's seed, apart
from the sampler's noise (the official code draws both from the global torch RNG).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.core.guidance import StopWindow
from mgd3.methods import METHODS, Batch, Method, as_tensor_modes, check_finite, class_modes_progress, option
from mgd3.core.mode_discovery import ClassModes, divisive_modes
from mgd3.core.sampling import Step

RADIUS_SCHEDULES = ("linear", "cosine", "exp")
FORMS = ("auto", "ddpm", "ddim")


def warm_radius(index: int, radius: float, stop: int, steps: int, max_mult: float, schedule: str,
                warm_steps: int) -> float:
    """The cloud radius at respaced step `index`: radius × max_mult at the noisiest step, shrinking
    to `radius` over `warm_steps` steps (not past the stop), then constant."""
    if index <= stop or max_mult <= 1.0:
        return float(radius)
    top = steps - 1
    cut = max(stop, top - warm_steps)  # the last index of the warm-up's end
    if index <= cut:
        return float(radius)
    p = min(max((index - cut) / max(1, top - cut), 0.0), 1.0)  # 1 at the noisiest step
    if schedule == "cosine":
        s = 0.5 * (1.0 + math.cos(math.pi * (1.0 - p)))
    elif schedule == "exp":
        s = (math.exp(p) - 1.0) / (math.e - 1.0)
    else:
        s = p
    return float(radius * (1.0 + (max_mult - 1.0) * s))


def noisy_cloud(mode: Tensor, radius: float, alpha_bar: float, points: int, gen: torch.Generator) -> Tensor:
    """(points, D) points around `mode` (D,), on spheres of radii half evenly spaced in [0.1, radius]
    and half uniform in [0, radius], noised to ᾱ."""
    d = mode.numel()
    half = points // 2
    dirs = torch.randn(points, d, generator=gen)  # (P, D)
    dirs = dirs / torch.norm(dirs, dim=-1, keepdim=True)
    radii = torch.cat([torch.linspace(0.1, radius, half), torch.rand(half, generator=gen) * radius])  # (2·half,)
    clean = mode.reshape(1, -1).cpu() + radii[:, None] * dirs[:len(radii)]  # (2·half, D)
    z = torch.randn(clean.shape, generator=gen)
    return clean * math.sqrt(alpha_bar) + math.sqrt(1.0 - alpha_bar) * z


def manifold_pull(x: Tensor, cloud: Tensor, neighbors: int, tangent_dim: int, bandwidth: float) -> Tensor:
    """tanh(d_min / bandwidth) · v / ‖v‖, v = −(I − UUᵀ)(x − μ): x (1, D) toward the tangent plane
    (mean μ, top `tangent_dim` principal directions U) of its `neighbors` nearest cloud points."""
    dist = torch.cdist(x, cloud)  # (1, P)
    near = torch.topk(dist, neighbors, largest=False, dim=1).indices[0]
    pts = cloud[near]  # (K, D)
    mu = pts.mean(0, keepdim=True)
    # principal directions of the neighbours: the top right singular vectors of the centred
    # points (the official code takes the top eigenvectors of their D×D covariance + 1e-5·I)
    _, _, vh = torch.linalg.svd(pts - mu, full_matrices=False)
    u = vh[:tangent_dim].T  # (D, d)
    to_mu = x - mu
    v = -(to_mu - to_mu @ u @ u.T)  # (1, D) the normal component, reversed
    direction = v / (torch.norm(v, dim=-1, keepdim=True) + 1e-8)
    return torch.tanh(dist.min(dim=1).values / bandwidth)[:, None] * direction


class ManifoldGuidance:
    """Mode guidance + manifold guidance (see the module docstring). modes: (B, C, h, w)."""

    def __init__(self, modes: Tensor, lam: float, scale: float, generators: list[torch.Generator], *,
                 stop: int, steps: int, form: str = "auto", neighbors: int = 12, tangent_dim: int = 3,
                 points: int = 300, radius: float = 0.1, bandwidth: float = 0.2, warm_steps: int = 5,
                 max_mult: float = 2.0, schedule: str = "exp"):
        self.targets, self.lam, self.scale, self.generators = modes, float(lam), float(scale), generators
        self.stop, self.steps, self.form = stop, steps, form
        self.neighbors, self.tangent_dim, self.points = neighbors, tangent_dim, points
        self.radius, self.bandwidth = radius, bandwidth
        self.warm_steps, self.max_mult, self.schedule = warm_steps, max_mult, schedule

    def manifold_term(self, step: Step) -> Tensor:
        r = warm_radius(step.index, self.radius, self.stop, self.steps, self.max_mult, self.schedule,
                        self.warm_steps)
        terms = []
        for b, gen in enumerate(self.generators):
            cloud = noisy_cloud(self.targets[b], r, step.alpha_bar, self.points, gen).to(step.x_t.device)
            x = step.x_t[b].reshape(1, -1).float()
            terms.append(manifold_pull(x, cloud, self.neighbors, self.tangent_dim, self.bandwidth))
        return self.scale * torch.cat(terms).reshape(step.x_t.shape)  # (B, C, h, w)

    def __call__(self, step: Step) -> Tensor:
        form = step.guidance_form if self.form == "auto" else self.form
        g = self.targets - step.x0  # (B, C, h, w)
        term = self.manifold_term(step) if self.scale > 0 else 0.0
        if form == "ddpm":
            return step.mean + self.lam * step.sigma * g + term
        x0 = step.x0 + self.lam * g + term
        return step.mean_from_eps(step.eps_from_x0(x0))


@dataclass(frozen=True)
class ManifoldGDOptions:
    mode_guidance_scale: float = option(0.1, "ManifoldGD (every backend: DiT, LDM UNet, SD): mode guidance "
                                             "scale λ (official --mode_guidance_scale)")
    manifold_guidance_scale: float = option(0.1, "ManifoldGD: manifold guidance scale η (0: mode guidance only)")
    t_stop: int | None = option(None, "stop guidance: guide while step index > t_stop (default steps // 2: "
                                      "25 of 50 guides the first 24 steps; -1 every step; steps none)")
    tangent_dim: int = option(3, "ManifoldGD: dimension of the local tangent plane (at most --neighbors - 1 "
                                 "and the latent size)")
    neighbors: int = option(12, "ManifoldGD: nearest cloud points whose PCA gives the tangent plane")
    manifold_points: int = option(300, "ManifoldGD: points of the noisy cloud around each mode (even)")
    manifold_radius: float = option(0.1, "ManifoldGD: cloud radius (ImageWoof/ImageNet scripts 0.1, "
                                         "ImageNette 0.05)")
    density_bandwidth: float = option(0.2, "ManifoldGD: weight tanh(distance to the cloud / bandwidth) "
                                           "(ImageWoof/ImageNette scripts 0.2, ImageNet 0.1)")
    radius_warm_steps: int = option(5, "ManifoldGD: guided steps over which the radius shrinks to its base")
    radius_max_mult: float = option(2.0, "ManifoldGD: radius multiplier at the first step")
    radius_schedule: str = option("exp", "ManifoldGD: radius warm-up schedule", choices=RADIUS_SCHEDULES)
    divisive_level: int = option(6, "ManifoldGD: level-aware order of the hierarchy's leaves: one leaf per "
                                    "depth from this level (1 = root; ImageWoof/ImageNette scripts 6, ImageNet 1)")
    divisive_criterion: str = option("sse", "ManifoldGD: which leaf to split next: largest sse or var",
                                     choices=("sse", "var"))
    manifold_form: str = option("auto", "ManifoldGD: ddpm (terms added to the mean, the released "
                                        "scripts) or ddim (added to x̂0, the official DDIM code); auto by "
                                        "sampler", choices=FORMS)
    tree_seed: int | None = option(None, "ManifoldGD: random_state of the hierarchy (default: the run's --seed, "
                                         "as the official code)")

    def __post_init__(self):
        check_finite("--mode-guidance-scale", self.mode_guidance_scale)
        check_finite("--manifold-guidance-scale", self.manifold_guidance_scale)
        check_finite("--manifold-radius", self.manifold_radius)
        check_finite("--radius-max-mult", self.radius_max_mult)
        check_finite("--density-bandwidth", self.density_bandwidth, minimum=1e-12)
        if self.neighbors < 2:
            raise Mgd3Error(f"--neighbors must be at least 2 (a plane needs two points), got {self.neighbors}")
        if self.manifold_points < 2 or self.manifold_points % 2:
            raise Mgd3Error(f"--manifold-points must be even and at least 2, got {self.manifold_points}")
        if self.neighbors > self.manifold_points:
            raise Mgd3Error(f"--neighbors ({self.neighbors}) must be at most --manifold-points "
                            f"({self.manifold_points})")
        if not 1 <= self.tangent_dim <= self.neighbors - 1:
            raise Mgd3Error(f"--tangent-dim must be in 1..{self.neighbors - 1} (--neighbors - 1: the rank of "
                            f"{self.neighbors} centred points), got {self.tangent_dim}")
        if self.radius_warm_steps < 0 or self.divisive_level < 1:
            raise Mgd3Error("--radius-warm-steps must be >= 0 and --divisive-level >= 1")


@METHODS.register("manifoldgd")
class ManifoldGD(Method):
    name = "manifoldgd"
    Options = ManifoldGDOptions

    def __init__(self, options: ManifoldGDOptions | None = None):
        super().__init__(options or ManifoldGDOptions())
        self.class_modes: dict[int, ClassModes] = {}
        self.stop_index: int | None = None
        self.seed = 0

    def validate(self, ctx):
        o = self.options
        steps = ctx.sampler.steps
        self.stop_index = steps // 2 if o.t_stop is None else o.t_stop
        if not -1 <= self.stop_index <= steps:
            raise Mgd3Error(f"--t-stop must be in -1..{steps} for {steps} steps, got {o.t_stop}")
        dim = int(np.prod(ctx.backend.latent_shape))
        if o.tangent_dim > dim:
            raise Mgd3Error(f"--tangent-dim {o.tangent_dim} is larger than the latent ({dim} values)")
        if o.manifold_form == "ddpm" and ctx.sampler.sampler == "ddim" and ctx.sampler.eta == 0:
            raise Mgd3Error("--manifold-form ddpm does nothing with DDIM at eta 0 (σ = 0); use ddim")
        self.seed = ctx.seed if o.tree_seed is None else o.tree_seed
        ctx.check_class_sizes()

    def prepare(self, ctx):
        o = self.options
        latents = ctx.real_latents()
        for c in class_modes_progress(ctx, "divisive modes"):
            flat = latents[c.index].numpy().reshape(len(latents[c.index]), -1)
            self.class_modes[c.index] = divisive_modes(np.ascontiguousarray(flat, dtype=np.float32), ctx.ipc, self.seed,
                                                 o.divisive_level, o.divisive_criterion)

    def generate(self, ctx, items):
        o = self.options
        shape = ctx.backend.latent_shape
        targets = torch.cat([as_tensor_modes(self.class_modes[it.cls.index].points[it.index], shape)
                             for it in items]).to(ctx.backend.device)  # (B, C, h, w)
        guide = ManifoldGuidance(targets, o.mode_guidance_scale, o.manifold_guidance_scale, cloud_generators(items),
                                 stop=self.stop_index, steps=ctx.sampler.steps, form=o.manifold_form,
                                 neighbors=o.neighbors, tangent_dim=o.tangent_dim, points=o.manifold_points,
                                 radius=o.manifold_radius, bandwidth=o.density_bandwidth,
                                 warm_steps=o.radius_warm_steps, max_mult=o.radius_max_mult,
                                 schedule=o.radius_schedule)
        return Batch(ctx.sample(items, guidance=[StopWindow(guide, self.stop_index)]),
                     mode_ids=[it.index for it in items])

    def manifest_info(self):
        return {"stop_guidance": {"t_stop": self.stop_index},
                "mode_discovery": {"finder": "divisive", "k": "ipc", "random_state": self.seed,
                                   "level": self.options.divisive_level,
                                   "assignment": "image k of a class is guided toward mode k",
                                   "per_class": {str(c): m.info for c, m in self.class_modes.items()}},
                "cloud_noise": "one generator per image, seeded from sha256('manifoldgd/<image seed>')"}


def cloud_generators(items) -> list[torch.Generator]:
    """The cloud's generator of each item: apart from the sampler's, seeded from the item's seed."""
    return [torch.Generator().manual_seed(int(hashlib.sha256(f"manifoldgd/{it.seed}".encode()).hexdigest()[:15], 16))
            for it in items]
