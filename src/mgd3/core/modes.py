"""Stage: mode discovery (MGD³ §3.1): per-class clustering of VAE latents, k = IPC.

Official setting: scikit-learn KMeans(n_clusters=IPC, random_state=0, n_init="auto") on the
flattened latent means; mode k = centroid k ("kmeans") or the real latent nearest to it
("kmeans-closest", paper Table 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mgd3.errors import Mgd3Error
from mgd3.registry import Registry


@dataclass
class Modes:
    """k modes of one class: modes (k, D) float32; `source` says how each was chosen."""

    modes: np.ndarray  # (k, D)
    assignment: np.ndarray  # (N,) cluster of each real latent
    nearest_real: np.ndarray  # (k,) index of the real latent nearest each mode
    info: dict = field(default_factory=dict)


ModeFinder = Callable[[np.ndarray, int, int], Modes]
MODE_FINDERS: Registry[ModeFinder] = Registry("mode finder")


def nearest(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(k,) index into `points` (N, D) of the point nearest each of `centers` (k, D), in float64.
    scikit-learn works through the (k, N) distances in chunks of bounded memory (its
    working_memory), never holding a k × N × D array."""
    from sklearn.metrics import pairwise_distances_argmin

    return pairwise_distances_argmin(np.asarray(centers, dtype=np.float64), np.asarray(points, dtype=np.float64))


def _check(latents: np.ndarray, k: int) -> None:
    if k < 1:
        raise Mgd3Error(f"IPC must be at least 1, got {k}")
    if len(latents) < k:
        raise Mgd3Error(f"IPC {k} is larger than the class ({len(latents)} images)")


def _kmeans(latents: np.ndarray, k: int, seed: int, minibatch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    km = (MiniBatchKMeans if minibatch else KMeans)(n_clusters=k, random_state=seed, n_init="auto").fit(latents)
    return km.cluster_centers_.astype(np.float32), km.labels_


@MODE_FINDERS.register("kmeans")
def kmeans_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    _check(latents, k)
    centers, labels = _kmeans(latents, k, seed)
    return Modes(centers, labels, nearest(latents, centers), {"finder": "kmeans", "random_state": seed})


@MODE_FINDERS.register("kmeans-minibatch")
def kmeans_minibatch_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """MiniBatchKMeans centroids (the official D4M prototypes)."""
    _check(latents, k)
    centers, labels = _kmeans(latents, k, seed, minibatch=True)
    return Modes(centers, labels, nearest(latents, centers), {"finder": "kmeans-minibatch", "random_state": seed})


@MODE_FINDERS.register("kmeans-closest")
def kmeans_closest_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    _check(latents, k)
    centers, labels = _kmeans(latents, k, seed)
    closest = nearest(latents, centers)
    return Modes(latents[closest].astype(np.float32), labels, closest,
                 {"finder": "kmeans-closest", "random_state": seed})


def find_modes(name: str, latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """latents: (N, ...) real latents of one class -> k modes, flattened to (k, D)."""
    flat = np.ascontiguousarray(latents.reshape(len(latents), -1), dtype=np.float32)
    return MODE_FINDERS.get(name)(flat, k, seed)


def _cluster_means(latents: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    """Means of the clusters in `labels` (-1 = noise), largest first; cycled when fewer than k."""
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    if len(ids) == 0:  # everything is noise: one cluster of all points
        ids, sizes, labels = np.array([0]), np.array([len(latents)]), np.zeros(len(latents), dtype=int)
    order = ids[np.argsort(-sizes, kind="stable")]
    chosen = [order[j % len(order)] for j in range(k)]
    modes = np.stack([latents[labels == c].mean(0) for c in chosen]).astype(np.float32)
    how = "largest clusters first" + (", then cycling" if len(order) < k else "")
    return modes, {"clusters_found": int(len(order)), "chosen": how}


@MODE_FINDERS.register("random")
def random_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """k distinct random real latents (the paper's 'random modes' row)."""
    _check(latents, k)
    idx = np.random.default_rng(seed).choice(len(latents), size=k, replace=False)
    modes = latents[idx].astype(np.float32)
    return Modes(modes, nearest(modes, latents), idx, {"finder": "random", "seed": seed})


@MODE_FINDERS.register("gmm")
def gmm_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """Means of a diagonal-covariance Gaussian mixture with k components."""
    from sklearn.mixture import GaussianMixture

    _check(latents, k)
    gm = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4).fit(latents)
    modes = gm.means_.astype(np.float32)
    return Modes(modes, gm.predict(latents), nearest(latents, modes), {"finder": "gmm", "random_state": seed})


@MODE_FINDERS.register("bisecting")
def bisecting_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """Divisive (bisecting) k-means centroids."""
    from sklearn.cluster import BisectingKMeans

    _check(latents, k)
    bk = BisectingKMeans(n_clusters=k, random_state=seed).fit(latents)
    modes = bk.cluster_centers_.astype(np.float32)
    return Modes(modes, bk.labels_, nearest(latents, modes), {"finder": "bisecting", "random_state": seed})


@MODE_FINDERS.register("spectral")
def spectral_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """Cluster means of spectral clustering on a nearest-neighbour graph."""
    from sklearn.cluster import SpectralClustering

    _check(latents, k)
    n_neighbors = min(10, len(latents) - 1)
    if k == 1 or n_neighbors < 2:
        labels = np.zeros(len(latents), dtype=int)
    else:
        labels = SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=n_neighbors,
                                    random_state=seed, assign_labels="cluster_qr").fit_predict(latents)
    modes, info = _cluster_means(latents, labels, k)
    return Modes(modes, labels, nearest(latents, modes), {"finder": "spectral", "random_state": seed, **info})


@MODE_FINDERS.register("dbscan")
def dbscan_modes(latents: np.ndarray, k: int, seed: int = 0) -> Modes:
    """DBSCAN cluster means. eps = median distance to the 10th nearest neighbour; the number of
    clusters is DBSCAN's own, so modes are the largest clusters first, cycled when fewer than k."""
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    _check(latents, k)
    m = min(10, len(latents) - 1)
    if m < 1:
        labels = np.zeros(len(latents), dtype=int)
        eps = 0.0
    else:
        dist, _ = NearestNeighbors(n_neighbors=m + 1).fit(latents).kneighbors(latents)
        eps = float(np.median(dist[:, -1]))
        labels = DBSCAN(eps=max(eps, 1e-6), min_samples=m).fit_predict(latents)
    modes, info = _cluster_means(latents, labels, k)
    return Modes(modes, labels, nearest(latents, modes), {"finder": "dbscan", "eps": eps, **info})
