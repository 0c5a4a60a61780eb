"""Method `d4m`: D4M prototypes (Su et al., CVPR 2024) through the shared sampler.

Prototypes = per-class k-means centroids of VAE latents (k = IPC; the official code uses
MiniBatchKMeans: mode finder `kmeans-minibatch`). Each prototype is noised to the img2img start
(strength 0.7 = 70 % of the sampling steps remain) and denoised with the class condition.
Strength 0 returns the prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mgd3.errors import Mgd3Error
from mgd3.methods import METHODS, Batch, Method, as_tensor_modes, class_modes_progress, option
from mgd3.core.mode_discovery import find_modes


@dataclass(frozen=True)
class D4MOptions:
    strength: float = option(0.7, "img2img strength: the fraction of sampling steps run from the noised "
                                  "prototype (0 returns the prototypes)")
    kmeans: str = option("minibatch", "k-means flavour: minibatch (official D4M) or full",
                         choices=("minibatch", "full"))
    mode_seed: int = option(0, "random_state of the clustering (official: 0)")


def start_index(steps: int, strength: float) -> int:
    """Respaced index to start from, as diffusers img2img: int(steps × strength) steps remain."""
    return int(steps * strength) - 1


@METHODS.register("d4m")
class D4M(Method):
    name = "d4m"
    Options = D4MOptions

    def __init__(self, options=None):
        super().__init__(options or D4MOptions())
        self.protos: dict[int, np.ndarray] = {}

    def validate(self, ctx):
        s = self.options.strength
        if not (0.0 <= s <= 1.0):
            raise Mgd3Error(f"--strength must be in [0, 1], got {s}")
        ctx.check_class_sizes()

    def prepare(self, ctx):
        finder = "kmeans-minibatch" if self.options.kmeans == "minibatch" else "kmeans"
        latents = ctx.real_latents()
        for c in class_modes_progress(ctx, "prototypes"):
            self.protos[c.index] = find_modes(finder, latents[c.index].numpy(), ctx.ipc, self.options.mode_seed).points

    def generate(self, ctx, items):
        shape = ctx.backend.latent_shape
        x0 = torch.cat([as_tensor_modes(self.protos[it.cls.index][it.index], shape) for it in items])
        return Batch(ctx.sample(items, x0=x0, start_index=start_index(ctx.sampler.steps, self.options.strength)),
                     mode_ids=[it.index for it in items])

    def manifest_info(self):
        o = self.options
        return {"prototypes": {"kmeans": o.kmeans, "k": "ipc", "random_state": o.mode_seed},
                "strength": o.strength}
