"""Stage: subset selection over generated candidates (the selection step S3, "Selective Subgroup
Sampling", of IMS3, Wang et al., CVPR 2026), for any generating method (`distill --select-from G`).

Every slot (class c, index k) gets G candidates, candidate j with its own generator seeded from
(seed, class, k, j), guided as the slot's image would be (toward mode k where a method has modes).
Per class, IPC of the G·IPC candidates are kept greedily, in the VAE latent space (the space the
modes and guidance live in; flattened latents): the subgroup S grows one candidate at a time,
each time by the candidate x that minimises

    J(S ∪ {x}) = ‖mean(S ∪ {x}) − μ_c‖ − min_{c' ≠ c} ‖mean(S ∪ {x}) − μ_c'‖

with μ the classes' real centroids (mean real latent over the real images modes are found from):
a subgroup representative of its class (its mean near μ_c) and distinct from the nearest other
class. Ties go to the lower candidate. The kept candidates become images 0..IPC-1 in the order
they were picked. mgd3's reading of the paper's description (no released code was available to
compare with); G = 1 is no selection.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)


def candidate_seed(seed: int, class_id: str, index: int, candidate: int) -> int:
    """A stable 63-bit seed for candidate `candidate` of slot (class, index)."""
    h = hashlib.sha256(f"mgd3/{seed}/{class_id}/{index}/candidate/{candidate}".encode()).hexdigest()
    return int(h[:15], 16)


def greedy_subgroup(candidates: np.ndarray, own: np.ndarray, others: np.ndarray, k: int) -> list[int]:
    """Indices of k rows of `candidates` (N, D), picked greedily (module docstring). own: (D,) the
    class centroid; others: (M, D) the other classes' centroids (M may be 0: then only the first
    term counts)."""
    x = np.asarray(candidates, dtype=np.float64)
    if not 1 <= k <= len(x):
        raise Mgd3Error(f"cannot keep {k} of {len(x)} candidates")
    own = np.asarray(own, dtype=np.float64)
    others = np.asarray(others, dtype=np.float64).reshape(-1, x.shape[1])
    picked: list[int] = []
    total = np.zeros(x.shape[1])
    free = np.ones(len(x), dtype=bool)
    for n in range(1, k + 1):
        means = (total[None] + x) / n  # (N, D) the subgroup's mean with each candidate added
        score = np.linalg.norm(means - own, axis=1)
        if len(others):
            score = score - np.min(np.linalg.norm(means[:, None] - others[None], axis=2), axis=1)
        score[~free] = np.inf
        j = int(np.argmin(score))
        picked.append(j)
        free[j] = False
        total += x[j]
    return picked


def check(method_cls, options, candidates: int | None) -> None:
    """--select-from G fits the method with these options (before anything loads)."""
    if candidates is None or candidates == 1:
        return
    if not method_cls.generative:
        raise Mgd3Error(f"--select-from selects among generated candidates; method {method_cls.name!r} "
                        "does not generate")
    method = method_cls(options) if method_cls.Options else method_cls()
    if method.order_dependent:
        raise Mgd3Error(f"--select-from does not compose with method {method_cls.name!r}, whose images depend "
                        "on the images generated before them")


@dataclass
class _Selected:
    class_index: int
    latents: torch.Tensor  # (IPC, C, h, w) in picking order
    mode_ids: list
    extra: list[dict]


class Selector:
    """Generates a class's candidates at its first batch, keeps IPC of them, and serves them."""

    def __init__(self, candidates: int, batch_size: int):
        self.candidates, self.batch_size = candidates, batch_size
        self.centroids: np.ndarray | None = None  # (K, D) over every class of the run
        self.current: _Selected | None = None

    def _centroids(self, ctx) -> np.ndarray:
        if self.centroids is None:
            from mgd3.core.encode import real_latents

            wanted = [c.index for c in ctx.all_classes]
            lat = ctx.real_latents() if [c.index for c in ctx.classes] == wanted else real_latents(
                ctx.backend, ctx.data, wanted, max_per_class=ctx.max_real_per_class,
                batch_size=ctx.encode_batch_size, workers=ctx.encode_workers, cache_dir=ctx.cache_dir,
                use_cache=ctx.use_cache, progress=ctx.progress)
            self.centroids = np.stack([lat[c].reshape(len(lat[c]), -1).double().mean(0).numpy() for c in wanted])
            self.index_of = {c: j for j, c in enumerate(wanted)}
        return self.centroids

    def _select(self, ctx, method, cls) -> _Selected:
        from mgd3.methods import Item

        g = self.candidates
        pool = [Item(cls, k, candidate_seed(ctx.seed, cls.class_id, k, j)) for k in range(ctx.ipc) for j in range(g)]
        lats, modes = [], []
        for start in range(0, len(pool), self.batch_size):
            chunk = pool[start:start + self.batch_size]
            out = method.generate(ctx, chunk)
            if out.latents is None:
                raise Mgd3Error(f"--select-from needs latents; method {method.name!r} returns images only")
            lats.append(out.latents.detach().cpu())
            modes += list(out.mode_ids or [None] * len(chunk))
        lats = torch.cat(lats)  # (IPC·G, C, h, w)
        cen = self._centroids(ctx)
        me = self.index_of[cls.index]
        picked = greedy_subgroup(lats.reshape(len(lats), -1).double().numpy(), cen[me], np.delete(cen, me, 0), ctx.ipc)
        # the image's record names the generator it was made with (its candidate's)
        extra = [{"seed": pool[j].seed, "selected_from": {"slot": pool[j].index, "candidate": j % g, "candidates": g}}
                 for j in picked]
        return _Selected(cls.index, lats[picked], [modes[j] for j in picked], extra)

    def generate(self, ctx, method, items: Sequence):
        from mgd3.methods import Batch

        cls = items[0].cls
        if self.current is None or self.current.class_index != cls.index:
            self.current = self._select(ctx, method, cls)
        s = self.current
        idx = [it.index for it in items]
        return Batch(s.latents[idx].to(ctx.backend.device), mode_ids=[s.mode_ids[i] for i in idx],
                     extra=[s.extra[i] for i in idx])
