"""Stage: mode discovery (MGD³ §3.1): per-class clustering of VAE latents, k = IPC.

Official setting: scikit-learn KMeans(n_clusters=IPC, random_state=0, n_init="auto") on the
flattened latent means; mode k = centroid k ("kmeans") or the real latent nearest to it
("kmeans-closest", paper Table 7).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mgd3.errors import Mgd3Error
from mgd3.registry import Registry


@dataclass
class ClassModes:
    """The k modes of one class: `points` (k, D) float32, the modes as flattened latents; `info` says how
    they were chosen."""

    points: np.ndarray  # (k, D)
    assignment: np.ndarray  # (N,) cluster of each real latent
    nearest_real: np.ndarray  # (k,) index of the real latent nearest each mode
    info: dict = field(default_factory=dict)


ModeFinder = Callable[[np.ndarray, int, int], ClassModes]
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
def kmeans_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    _check(latents, k)
    centers, labels = _kmeans(latents, k, seed)
    return ClassModes(centers, labels, nearest(latents, centers), {"finder": "kmeans", "random_state": seed})


@MODE_FINDERS.register("kmeans-minibatch")
def kmeans_minibatch_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    """MiniBatchKMeans centroids (the official D4M prototypes)."""
    _check(latents, k)
    centers, labels = _kmeans(latents, k, seed, minibatch=True)
    return ClassModes(centers, labels, nearest(latents, centers), {"finder": "kmeans-minibatch", "random_state": seed})


@MODE_FINDERS.register("kmeans-closest")
def kmeans_closest_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    _check(latents, k)
    centers, labels = _kmeans(latents, k, seed)
    closest = nearest(latents, centers)
    return ClassModes(latents[closest].astype(np.float32), labels, closest,
                 {"finder": "kmeans-closest", "random_state": seed})


def find_modes(name: str, latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
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
def random_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    """k distinct random real latents (the paper's 'random modes' row)."""
    _check(latents, k)
    idx = np.random.default_rng(seed).choice(len(latents), size=k, replace=False)
    modes = latents[idx].astype(np.float32)
    return ClassModes(modes, nearest(modes, latents), idx, {"finder": "random", "seed": seed})


@MODE_FINDERS.register("gmm")
def gmm_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    """Means of a diagonal-covariance Gaussian mixture with k components."""
    from sklearn.mixture import GaussianMixture

    _check(latents, k)
    gm = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4).fit(latents)
    modes = gm.means_.astype(np.float32)
    return ClassModes(modes, gm.predict(latents), nearest(latents, modes), {"finder": "gmm", "random_state": seed})


@MODE_FINDERS.register("bisecting")
def bisecting_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    """Divisive (bisecting) k-means centroids."""
    from sklearn.cluster import BisectingKMeans

    _check(latents, k)
    bk = BisectingKMeans(n_clusters=k, random_state=seed).fit(latents)
    modes = bk.cluster_centers_.astype(np.float32)
    return ClassModes(modes, bk.labels_, nearest(latents, modes), {"finder": "bisecting", "random_state": seed})


@MODE_FINDERS.register("spectral")
def spectral_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
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
    return ClassModes(modes, labels, nearest(latents, modes), {"finder": "spectral", "random_state": seed, **info})


@MODE_FINDERS.register("dbscan")
def dbscan_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
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
    return ClassModes(modes, labels, nearest(latents, modes), {"finder": "dbscan", "eps": eps, **info})


def _sse(points: np.ndarray) -> float:
    if len(points) <= 1:
        return 0.0
    return float(((points - points.mean(0, keepdims=True)) ** 2).sum())


def _var(points: np.ndarray) -> float:
    return float(np.var(points)) if len(points) > 1 else 0.0


def divisive_tree(latents: np.ndarray, k: int, seed: int = 0, criterion: str = "sse") -> list[tuple[np.ndarray, int]]:
    """ManifoldGD's hierarchy (Roy et al., CVPR 2026): split the leaf of largest SSE (or variance)
    in two with KMeans(2, n_init=10) until there are k leaves. Returns the leaves in the order
    they were made, as (member indices, depth). A leaf that k-means cannot split (one side empty)
    is split in halves of a shuffled order; a leaf of one point is not split."""
    from sklearn.cluster import KMeans

    score = _sse if criterion == "sse" else _var
    rng = np.random.RandomState(seed)
    leaves: list[tuple[np.ndarray, int]] = [(np.arange(len(latents)), 0)]
    while len(leaves) < k:
        j = int(np.argmax([score(latents[idx]) for idx, _ in leaves]))
        idx, depth = leaves.pop(j)
        if len(idx) <= 1:  # nothing to split: back to the end, try the next
            leaves.append((idx, depth))
            if all(len(i) <= 1 for i, _ in leaves):
                break
            continue
        labels = KMeans(n_clusters=2, n_init=10, random_state=rng.randint(1 << 31)).fit_predict(latents[idx])
        left, right = idx[labels == 0], idx[labels == 1]
        if len(left) == 0 or len(right) == 0:
            rng.shuffle(idx)
            left, right = idx[:len(idx) // 2], idx[len(idx) // 2:]
        leaves += [(left, depth + 1), (right, depth + 1)]
    return leaves


def pick_by_levels(depths: list[int], k: int, level: int, seed: int = 0) -> list[int]:
    """ManifoldGD's level-aware order of the leaves (positions into `depths`): one random leaf
    from each depth, starting at depth `level` - 1 (level 1 = the root's depth), then the rest
    from the deepest depth up, shuffled within a depth."""
    rng = np.random.RandomState(seed)
    by_depth: dict[int, list[int]] = {}
    for pos, d in enumerate(depths):
        by_depth.setdefault(d, []).append(pos)
    deepest = max(by_depth) if by_depth else 0
    picked: list[int] = []
    for d in range(min(max(0, level - 1), deepest), deepest + 1):
        pool = [p for p in by_depth.get(d, []) if p not in picked]
        if pool:
            picked.append(int(rng.choice(pool)))
            if len(picked) >= k:
                return picked[:k]
    for d in range(deepest, -1, -1):
        if len(picked) >= k:
            break
        pool = [p for p in by_depth.get(d, []) if p not in picked]
        rng.shuffle(pool)
        picked += pool[:k - len(picked)]
    return picked[:k]


def divisive_modes(latents: np.ndarray, k: int, seed: int = 0, level: int = 6, criterion: str = "sse") -> ClassModes:
    """The multi-scale centroids of ManifoldGD: the means of the k leaves of `divisive_tree`
    (leaves end at different depths: coarse and fine clusters), ordered by `pick_by_levels`."""
    _check(latents, k)
    leaves = divisive_tree(latents, k, seed, criterion)
    order = pick_by_levels([d for _, d in leaves], k, level, seed)
    modes = np.stack([latents[leaves[p][0]].mean(0) for p in order]).astype(np.float32)
    labels = np.empty(len(latents), dtype=np.int64)
    for j, p in enumerate(order):
        labels[leaves[p][0]] = j
    return ClassModes(modes, labels, nearest(latents, modes),
                 {"finder": "divisive", "random_state": seed, "level": level, "criterion": criterion,
                  "depths": [int(leaves[p][1]) for p in order]})


@MODE_FINDERS.register("divisive")
def divisive_default_modes(latents: np.ndarray, k: int, seed: int = 0) -> ClassModes:
    """ManifoldGD's divisive hierarchy with its released setting (level 6, SSE)."""
    return divisive_modes(latents, k, seed)


# --------------------------------------------------------------------------- CoDA core samples


@dataclass
class _Cluster:
    center: np.ndarray  # in the embedding
    mask: np.ndarray  # (N,) bool, its points
    origin: str  # "hdbscan_initial", "hdbscan_kmeans_split" or "kmeans_outliers"
    best: int | None = None  # the most probable point of an initial cluster

    @property
    def size(self) -> int:
        return int(self.mask.sum())


def umap_embedding(latents: np.ndarray, n_neighbors: int = 85, components: int = 50, seed: int = 42) -> np.ndarray:
    """CoDA's embedding: StandardScaler, then UMAP(n_components, n_neighbors, min_dist 0,
    random_state 42) (umap-learn). Clipped to the class: n_neighbors <= N - 1, components <= N - 2."""
    from sklearn.preprocessing import StandardScaler

    try:
        from umap import UMAP
    except ImportError:
        raise Mgd3Error("CoDA's umap-hdbscan core samples need umap-learn (pip install umap-learn); "
                        "--coda-modes pooled-kmeans does not") from None
    n = len(latents)
    x = StandardScaler().fit_transform(latents)
    return UMAP(n_components=max(1, min(components, n - 2)), n_neighbors=max(2, min(n_neighbors, n - 1)),
                min_dist=0.0, random_state=seed).fit_transform(x)


def _hdbscan(x: np.ndarray, min_cluster_size: int, min_samples: int):
    from sklearn.cluster import HDBSCAN

    return HDBSCAN(min_cluster_size=max(2, min(min_cluster_size, len(x))),
                   min_samples=max(1, min(min_samples, len(x))), copy=True).fit(x)


class _CoreClusters:
    """CoDA's post-processing of the HDBSCAN clusters to exactly k (released `postprocess.py`)."""

    def __init__(self, x: np.ndarray, min_cluster_size: int, min_samples: int, seed_candidates: int):
        self.x, self.min_cluster_size, self.min_samples = x, min_cluster_size, min_samples
        self.seed_candidates = seed_candidates
        self.clusters: dict[int, _Cluster] = {}
        self.next_id = 0

    def split(self, cid: int, working: list[int], min_cluster_size: int) -> None:
        """Split cluster `cid` in two: HDBSCAN on its points finds sub-clusters; 2-means seeded by
        each pair of the largest sub-clusters' most probable points, the pair of least inertia wins."""
        from sklearn.cluster import KMeans

        mom = self.clusters[cid]
        idx = np.where(mom.mask)[0]
        pts = self.x[idx]
        sub = _hdbscan(pts, min_cluster_size, self.min_samples)
        n_sub = len(np.unique(sub.labels_)) - (1 if -1 in sub.labels_ else 0)
        if n_sub < 2:
            return
        del self.clusters[cid]
        found = []
        for i in range(n_sub):
            m = sub.labels_ == i
            found.append((int(m.sum()), pts[m][np.argmax(sub.probabilities_[m])]))
        found.sort(key=lambda c: c[0], reverse=True)
        best, best_inertia = None, float("inf")
        for a, b in itertools.combinations(range(min(self.seed_candidates, n_sub)), 2):
            km = KMeans(n_clusters=2, init=np.array([found[a][1], found[b][1]]), n_init=1, random_state=0).fit(pts)
            if km.inertia_ < best_inertia:
                best, best_inertia = km, km.inertia_
        for i in range(2):
            mask = np.zeros(len(self.x), dtype=bool)
            mask[idx[best.labels_ == i]] = True
            new = self._add(_Cluster(best.cluster_centers_[i], mask, "hdbscan_kmeans_split"))
            if self.clusters[new].size >= min_cluster_size * 2:
                working.append(new)

    def _add(self, c: _Cluster) -> int:
        self.clusters[self.next_id] = c
        self.next_id += 1
        return self.next_id - 1

    def _largest(self, k: int) -> None:
        keep = sorted(self.clusters.items(), key=lambda kv: kv[1].size, reverse=True)[:k]
        self.clusters = dict(keep)

    def to_k(self, k: int) -> list[str]:
        """Make exactly k clusters; returns the strategies used."""
        from sklearn.cluster import KMeans

        used = []
        if len(self.clusters) > k:  # more clusters than IPC: the k largest
            self._largest(k)
            return ["largest"]
        mcs = self.min_cluster_size
        working = [cid for cid, c in self.clusters.items() if c.size >= mcs * 2]
        while len(self.clusters) < k and working:  # strategy 1: split the largest splittable cluster
            working.sort(key=lambda cid: self.clusters[cid].size, reverse=True)
            self.split(working.pop(0), working, mcs)
            used.append("split")
        if len(self.clusters) > k:
            self._largest(k)
        if len(self.clusters) < k:
            need = k - len(self.clusters)
            assigned = np.zeros(len(self.x), dtype=bool)
            for c in self.clusters.values():
                assigned |= c.mask
            noise = np.where(~assigned)[0]
            factor = 1 if k > 50 else 3 if k > 10 else 5
            working = [cid for cid, c in self.clusters.items() if c.size >= mcs]
            if len(noise) < need * factor and working:  # strategy 3: forced splits, smaller and smaller
                used.append("forced-split")
                while len(self.clusters) < k and working:
                    working.sort(key=lambda cid: self.clusters[cid].size, reverse=True)
                    before, m = self.next_id, float(mcs)
                    while before == self.next_id:
                        m *= 0.75
                        self.split(working[0], working, max(int(m), 2))
                        if m <= 2:
                            break
                    working.pop(0)
            if len(self.clusters) < k:  # strategy 2: k-means on the points no cluster holds
                # (the released code reaches here only with enough noise points; with too few and
                # nothing left to split it fails, mgd3 clusters every point instead)
                need = k - len(self.clusters)
                pool = noise if len(noise) >= need else np.arange(len(self.x))
                used.append("kmeans-noise" if pool is noise else "kmeans-all")
                km = KMeans(n_clusters=need, random_state=0, n_init="auto").fit(self.x[pool])
                for i in range(need):
                    mask = np.zeros(len(self.x), dtype=bool)
                    mask[pool[km.labels_ == i]] = True
                    self._add(_Cluster(km.cluster_centers_[i], mask, "kmeans_outliers"))
        return used


def core_samples(embedding: np.ndarray, k: int, min_cluster_size: int = 55, min_samples: int = 3,
                 seed_candidates: int = 3) -> tuple[np.ndarray, np.ndarray, dict]:
    """CoDA's core samples from an embedding (N, d): HDBSCAN clusters, made exactly k
    (`_CoreClusters.to_k`), each represented by a real point: an initial cluster's most probable
    point, another's point nearest its centre. Returns (k,) indices, (N,) labels, info."""
    from sklearn.metrics.pairwise import euclidean_distances

    hdb = _hdbscan(embedding, min_cluster_size, min_samples)
    labels = hdb.labels_
    m = len(np.unique(labels)) - (1 if -1 in labels else 0)
    state = _CoreClusters(embedding, min_cluster_size, min_samples, seed_candidates)
    for cid in range(m):
        mask = labels == cid
        best = int(np.where(mask)[0][np.argmax(hdb.probabilities_[mask])])
        state._add(_Cluster(embedding[best], mask, "hdbscan_initial", best))
    strategies = state.to_k(k)
    chosen, assignment = [], np.full(len(embedding), -1)
    for j, c in enumerate(state.clusters.values()):
        if c.origin == "hdbscan_initial":
            chosen.append(c.best)
        else:
            members = np.where(c.mask)[0]
            chosen.append(int(members[np.argmin(euclidean_distances(embedding[members], c.center.reshape(1, -1)))]))
        assignment[c.mask] = j
    return np.asarray(chosen), assignment, {"hdbscan_clusters": int(m), "strategies": strategies}


def coda_umap_hdbscan_modes(latents: np.ndarray, k: int, *, n_neighbors: int = 85, components: int = 50,
                            min_cluster_size: int = 55, min_samples: int = 3, seed_candidates: int = 3,
                            umap_seed: int = 42) -> ClassModes:
    """CoDA's core samples (released `CoDA_main.py`): real latents chosen in a UMAP embedding."""
    _check(latents, k)
    emb = umap_embedding(latents, n_neighbors, components, umap_seed)
    chosen, labels, info = core_samples(emb, k, min_cluster_size, min_samples, seed_candidates)
    return ClassModes(latents[chosen].astype(np.float32), labels, chosen,
                 {"finder": "umap-hdbscan", "umap_random_state": umap_seed, **info})


def pooled_kmeans_modes(latents: np.ndarray, shape: tuple[int, ...], k: int, seed: int = 0, pool: int = 8) -> ClassModes:
    """k-means (k = IPC) on average-pooled latents (C, min(pool, h), min(pool, w)); mode j = the real
    latent nearest centroid j in the pooled space."""
    import torch

    _check(latents, k)
    x = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)).reshape(len(latents), *shape)
    size = (min(pool, shape[-2]), min(pool, shape[-1]))
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1).numpy()  # (N, C·p·p)
    centers, labels = _kmeans(pooled, k, seed)
    chosen = nearest(pooled, centers)
    return ClassModes(latents[chosen].astype(np.float32), labels, chosen,
                 {"finder": "pooled-kmeans", "pool": list(size), "random_state": seed})
