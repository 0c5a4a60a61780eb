"""Report metrics: diversity, representativeness and mode coverage of a distilled set against the
real data, and the 2-D embeddings of its figures — plain functions on arrays.

Feature space: the model's VAE latents (posterior mean × scaling factor, what `mgd3.core.encode`
caches), flattened to vectors of C·h·w.

- ``diversity(D) = 1 − mean_{i<j} cos(d_i, d_j)`` over the n distilled latents of a class
  (mean pairwise cosine distance; 0 = all identical in direction; undefined for n < 2);
- ``representativeness(D, R, k) = mean_i mean_{r ∈ kNN(d_i)} cos(d_i, r)``: for every distilled
  latent, the mean cosine similarity to its k most similar real latents of the class (k = min(50,
  |R|) by default), averaged over the distilled latents — higher is better;
- ``mode_coverage(D, M)``: the modes M are k-means centroids (k = IPC, random_state 0, exactly
  `mgd3.core.mode_discovery.find_modes("kmeans", ...)`) of the class's real latents; every distilled latent is
  assigned to its nearest mode (Euclidean, as k-means; ties to the lower index); a mode is covered
  when at least one distilled latent is assigned to it. Coverage = covered / k.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from mgd3.errors import Mgd3Error
from mgd3.registry import Registry

log = logging.getLogger(__name__)

TSNE_MIN_POINTS = 10  # fewer points than this: t-SNE is not meaningful (and may not run) -> PCA

DEFINITIONS = {
    "feature_space": "VAE latents of the set's model (posterior mean × scaling factor, as mgd3.core.encode "
                     "caches them), flattened to vectors of C·h·w",
    "diversity": "per class: 1 − mean cosine similarity over all pairs i<j of the class's distilled latents "
                 "(mean pairwise cosine distance; higher = more diverse; undefined for one image per class)",
    "representativeness": "per class: for each distilled latent, the mean cosine similarity to its k most "
                          "similar real latents of the class (k = min(K, number of real latents)), averaged "
                          "over the class's distilled latents (higher = closer to the real data)",
    "mode_coverage": "per class: k-means with k = IPC (random_state 0, mgd3.core.mode_discovery.find_modes('kmeans')) on the "
                     "class's real latents; each distilled latent is assigned to its nearest centroid "
                     "(Euclidean); a mode is covered when at least one distilled latent is assigned to it; "
                     "coverage = covered modes / k, averaged over classes per set",
    "ior": "improvement over random real = mean accuracy − random-real reference accuracy (same protocol, IPC)",
    "recovery": "recovery of full-data accuracy = mean accuracy / full-data reference accuracy",
    "hlr": "hard-label recovery gap (DD-Ranking) = full-data accuracy − mean accuracy",
    "lrs": "DD-Ranking 0.2's label-robust score (0.1: DDRS) = (e^a - e^-1) / (e - e^-1), a = 0.5 IOR - 0.5 HLR "
           "(accuracies as fractions)",
    "ars": "DD-Ranking 0.2's augmentation-robust score = (e^b - e^-1) / (e - e^-1), b = 0.5 IOR with augmentation "
           "(dc-dsa) + 0.5 IOR without (dc) (fractions); on every row of a set evaluated under both",
}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """(n, ...) -> (n, D) float64 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, ...) and (m, ...) -> (n, m) cosine similarities of the flattened rows (0 for a zero row)."""
    return _unit_rows(a) @ _unit_rows(b).T


def diversity(distilled: np.ndarray) -> float:
    """1 − mean pairwise cosine similarity among the rows of `distilled` (n, ...); NaN if n < 2."""
    n = len(distilled)
    if n < 2:
        return float("nan")
    s = cosine_similarity(distilled, distilled)  # (n, n)
    i, j = np.triu_indices(n, k=1)
    return float(1.0 - s[i, j].mean())


def representativeness(distilled: np.ndarray, real: np.ndarray, k: int = 50) -> float:
    """Mean over distilled rows of the mean cosine similarity to their k most similar real rows
    (k = min(k, len(real))); NaN if either side is empty."""
    if len(distilled) == 0 or len(real) == 0:
        return float("nan")
    if k < 1:
        raise Mgd3Error(f"the number of neighbours must be at least 1, got {k}")
    k = min(k, len(real))
    s = cosine_similarity(distilled, real)  # (n, m)
    top = -np.sort(-s, axis=1)[:, :k]  # (n, k) the k largest similarities per distilled row
    return float(top.mean())


def nearest_mode(points: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """(n, ...) points, (k, ...) modes -> (n,) index of the nearest mode (Euclidean; ties: lowest)."""
    from mgd3.core.mode_discovery import nearest

    p = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    m = np.asarray(modes, dtype=np.float64).reshape(len(modes), -1)
    return nearest(m, p)  # for each point, the nearest of the modes (bounded memory)


def mode_coverage(distilled: np.ndarray, modes: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of modes with at least one distilled row assigned to them, (n,) assignments)."""
    if len(distilled) == 0:
        return 0, np.zeros(0, dtype=np.int64)
    assign = nearest_mode(distilled, modes)
    return int(len(np.unique(assign))), assign


def set_metrics(distilled: dict[str, np.ndarray], real: dict[str, np.ndarray], ipc: int,
                neighbors: int = 50) -> dict:
    """Per-class diversity, representativeness and mode coverage, and their means over classes."""
    from mgd3.core.mode_discovery import find_modes

    per_class = {}
    for cid, d in distilled.items():
        r = real.get(cid)
        if r is None or len(r) == 0:
            raise Mgd3Error(f"class {cid!r} of the set has no real images in the data")
        k = min(ipc, len(r))
        modes = find_modes("kmeans", r, k, seed=0).points  # (k, D), exactly mgd3's modes (random_state 0)
        covered, assign = mode_coverage(d, modes)
        per_class[cid] = {"n_distilled": len(d), "n_real": len(r), "diversity": diversity(d),
                          "representativeness": representativeness(d, r, neighbors),
                          "modes": k, "covered": covered, "coverage": covered / k,
                          "assignment": assign.tolist()}

    def mean(key):
        v = [c[key] for c in per_class.values() if not math.isnan(c[key])]
        return float(np.mean(v)) if v else float("nan")

    return {"per_class": per_class, "diversity": mean("diversity"),
            "representativeness": mean("representativeness"), "coverage": mean("coverage"),
            "covered": int(sum(c["covered"] for c in per_class.values())),
            "modes": int(sum(c["modes"] for c in per_class.values()))}


Embedding = Callable[[np.ndarray, int], np.ndarray]
EMBEDDINGS: Registry[Embedding] = Registry("embedding")


@EMBEDDINGS.register("pca")
def pca_embedding(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, D) -> (n, 2): the first two principal components (zero-padded when fewer exist)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    out = np.zeros((len(x), 2))
    if len(x) < 2:
        return out
    from sklearn.decomposition import PCA

    n_comp = min(2, len(x), x.shape[1])
    out[:, :n_comp] = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    return out


@EMBEDDINGS.register("tsne")
def tsne_embedding(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, D) -> (n, 2): sklearn t-SNE (PCA init, perplexity min(30, (n − 1) / 3))."""
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def embed(name: str, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """The embedding `name` of x (n, D), and the name actually used: t-SNE falls back to PCA for
    fewer than TSNE_MIN_POINTS points."""
    fn = EMBEDDINGS.get(name)
    if name == "tsne" and len(x) < TSNE_MIN_POINTS:
        log.info("only %d points: PCA instead of t-SNE", len(x))
        return pca_embedding(x, seed), "pca"
    return fn(x, seed), name
