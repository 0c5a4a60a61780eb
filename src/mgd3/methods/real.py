"""Real-data baselines (no sampling): `random-real` (a seeded random subset) and `kmeans-real`
(per class, the real image whose latent is nearest each k-means centroid — the MGD³ ablation
row "real images nearest the centres")."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from mgd3.methods import METHODS, Batch, Method, class_modes_progress, option
from mgd3.core.mode_discovery import find_modes


def _images(ctx, indices: list[int]) -> torch.Tensor:
    ds = ctx.data.dataset(indices)
    return torch.stack([ds[j][0] for j in range(len(indices))])  # (B, C, R, R)


class RealSubset(Method):
    generative = False
    needs = "nothing"
    chosen: dict[int, np.ndarray]  # class index -> item indices into the data, one per k

    def validate(self, ctx):
        ctx.check_class_sizes()

    def generate(self, ctx, items):
        idx = [int(self.chosen[it.cls.index][it.index]) for it in items]
        images = _images(ctx, idx)
        return Batch(ctx.latents_of(images), images=images, mode_ids=self.mode_ids(items),
                     extra=[{"real_index": i} for i in idx])

    def mode_ids(self, items):
        return [None] * len(items)


@METHODS.register("random-real")
class RandomReal(RealSubset):
    """IPC random real images per class, drawn with a generator seeded from (seed, class id)."""

    name = "random-real"

    def prepare(self, ctx):
        self.chosen = {}
        for c in ctx.classes:
            s = int(hashlib.sha256(f"random-real/{ctx.seed}/{c.class_id}".encode()).hexdigest()[:15], 16)
            pool = ctx.data.indices(c.index)
            self.chosen[c.index] = np.random.default_rng(s).choice(pool, size=ctx.ipc, replace=False)


@dataclass(frozen=True)
class KMeansRealOptions:
    mode_seed: int = option(0, "random_state of the clustering (official: 0)")


@METHODS.register("kmeans-real")
class KMeansReal(RealSubset):
    name = "kmeans-real"
    needs = "vae"
    Options = KMeansRealOptions

    def __init__(self, options=None):
        super().__init__(options or KMeansRealOptions())

    def prepare(self, ctx):
        latents = ctx.real_latents()
        self.chosen = {}
        for c in class_modes_progress(ctx, "k-means"):
            m = find_modes("kmeans", latents[c.index].numpy(), ctx.ipc, self.options.mode_seed)
            self.chosen[c.index] = ctx.real_indices(c.index)[m.nearest_real]

    def mode_ids(self, items):
        return [it.index for it in items]
