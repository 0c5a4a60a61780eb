"""Stage: report — read distilled sets (and their eval.json) back and compare them.

`mgd3 report DIR... --out REPORT_DIR` writes REPORT_DIR/report.md, a self-contained
REPORT_DIR/report.html (images embedded as base64), REPORT_DIR/report.json (every number) and
the PNG figures:

1. accuracy per set and evaluation (mean ± std over evaluation seeds), improvement over random
   real images (IOR = acc − random-real acc, same protocol and IPC) and recovery of full-data
   accuracy (acc / full-data acc; HLR = full − acc as in DD-Ranking, docs/METHODS.md §6.1);
2. each set's sample grid (class names on the left) and, for several sets, the grids side by side;
3. a 2-D embedding (t-SNE, or PCA) of distilled vs real latents per class (MGD³ Fig. 5);
4. diversity vs representativeness per class (MGD³ Fig. 8, docs/METHODS.md §6.2);
5. mode coverage: how many of the IPC k-means modes of the real latents the distilled set hits;
6. the stage timings from the manifest and eval.json.

Feature space of 3–5: the model's VAE latents (posterior mean × scaling factor, what
`mgd3.core.encode` caches), flattened to vectors of C·h·w. The metric functions below are plain
functions on arrays:

- ``diversity(D) = 1 − mean_{i<j} cos(d_i, d_j)`` over the n distilled latents of a class
  (mean pairwise cosine distance; 0 = all identical in direction; undefined for n < 2);
- ``representativeness(D, R, k) = mean_i mean_{r ∈ kNN(d_i)} cos(d_i, r)``: for every distilled
  latent, the mean cosine similarity to its k most similar real latents of the class (k = min(50,
  |R|) by default), averaged over the distilled latents — higher is better;
- ``mode_coverage(D, M)``: the modes M are k-means centroids (k = IPC, random_state 0, exactly
  `mgd3.core.modes.find_modes("kmeans", ...)`) of the class's real latents; every distilled latent is
  assigned to its nearest mode (Euclidean, as k-means; ties to the lower index); a mode is covered
  when at least one distilled latent is assigned to it. Coverage = covered / k.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import re
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mgd3.version import __version__
from mgd3.config import POSITIVE, Rule, check_cache_dir, check_device, check_rules, check_types, convert, fill, resolve_device
from mgd3.errors import Mgd3Error
from mgd3.evaluation.core import ars, lrs
from mgd3.files import write_text_atomic
from mgd3.registry import Registry

log = logging.getLogger(__name__)

REPORT_FORMAT = "mgd3-report/1"
TSNE_MIN_POINTS = 10  # fewer points than this: t-SNE is not meaningful (and may not run) -> PCA

DEFINITIONS = {
    "feature_space": "VAE latents of the set's model (posterior mean × scaling factor, as mgd3.core.encode "
                     "caches them), flattened to vectors of C·h·w",
    "diversity": "per class: 1 − mean cosine similarity over all pairs i<j of the class's distilled latents "
                 "(mean pairwise cosine distance; higher = more diverse; undefined for one image per class)",
    "representativeness": "per class: for each distilled latent, the mean cosine similarity to its k most "
                          "similar real latents of the class (k = min(K, number of real latents)), averaged "
                          "over the class's distilled latents (higher = closer to the real data)",
    "mode_coverage": "per class: k-means with k = IPC (random_state 0, mgd3.core.modes.find_modes('kmeans')) on the "
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


# --------------------------------------------------------------------------- metrics (plain functions)


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
    from mgd3.core.modes import nearest

    p = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    m = np.asarray(modes, dtype=np.float64).reshape(len(modes), -1)
    return nearest(m, p)  # for each point, the nearest of the modes (bounded memory)


def mode_coverage(distilled: np.ndarray, modes: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of modes with at least one distilled row assigned to them, (n,) assignments)."""
    if len(distilled) == 0:
        return 0, np.zeros(0, dtype=np.int64)
    assign = nearest_mode(distilled, modes)
    return int(len(np.unique(assign))), assign


# --------------------------------------------------------------------------- 2-D embeddings

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


# --------------------------------------------------------------------------- reading sets


@dataclass
class ReportConfig:
    sets: list[str]
    out: str = "report"
    data: str | None = None  # real data (default: the name in the manifests)
    embedding: str = "tsne"
    max_real_per_class: int | None = None  # None: the manifest's max_real_per_class (the set's subset)
    plot_real_per_class: int = 200  # real points per class in the embedding plot
    neighbors: int = 50  # k of representativeness
    device: str = "auto"
    encode_batch_size: int = 64
    cache_dir: str | None = None
    threads: int | None = None  # CPU threads for encoding, k-means and t-SNE (None: the libraries' default)
    progress: bool = True
    references: bool = True  # train an evaluation's missing random-real reference (as `mgd3 evaluate` does)


@dataclass
class SetInfo:
    path: Path
    label: str  # unique short name in the report
    manifest: dict
    evals: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # manifest path -> checked file inside the set

    @property
    def method(self) -> str:
        return str(self.manifest.get("method"))

    @property
    def ipc(self) -> int:
        """The manifest's IPC, else the largest number of images of a class."""
        if self.manifest.get("ipc"):
            return int(self.manifest["ipc"])
        counts: dict[str, int] = {}
        for im in self.manifest.get("images") or []:
            counts[str(im.get("class_id"))] = counts.get(str(im.get("class_id")), 0) + 1
        return max(counts.values(), default=0)

    @property
    def data_name(self) -> str | None:
        return (self.manifest.get("data") or {}).get("name")


def set_model(s: "SetInfo") -> str:
    """The model folder that made the set, checked: a local folder or a repo id already in the
    Hugging Face cache (a set's contents never start a download), whose fingerprint is the one the
    manifest recorded (a model swapped in at that path is refused, not used)."""
    from mgd3.files import folder_fingerprint as model_fingerprint

    m = s.manifest
    rec = m.get("model") or {}
    model = rec.get("path") or (m.get("config") or {}).get("model")
    if not model or not isinstance(model, str):
        raise Mgd3Error(f"{s.path}/manifest.json does not name its model")
    p = Path(model).expanduser()
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001  (not a repo id, not cached)
            raise Mgd3Error(f"{s.path}/manifest.json names model {model[:120]!r}, which is not a local folder nor in "
                            "the Hugging Face cache; report never downloads what a set names") from None
    want = rec.get("fingerprint")
    if want is None:
        log.warning("%s/manifest.json records no model fingerprint; %s is used unchecked", s.path, p)
    elif model_fingerprint(p) != want:
        raise Mgd3Error(f"the model at {p} is not the one that made {s.path} (its fingerprint {model_fingerprint(p)} "
                        f"!= {want} in the manifest); put that model back there")
    return str(p)


def _read_json(f: Path) -> dict:
    from mgd3 import safeio

    return safeio.read_json_object(f, 16 << 20, str(f), "evaluation result")


def _eval_key(r: dict) -> tuple:
    p = r.get("protocol") or {}
    return (p.get("name"), r.get("arch"), p.get("epochs"), tuple(r.get("seeds") or ()))


def _number(v, what: str, f: Path, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Mgd3Error(f"{f}: {what} must be a finite number, got {str(v)[:40]!r}")


def _check_eval(r: dict, f: Path) -> None:
    """The numbers a report reads from an eval.json are numbers."""
    _number(r.get("mean"), "mean", f, optional=False)
    _number(r.get("std"), "std", f)
    _number(r.get("train_seconds"), "train_seconds", f)
    for key in ("set", "protocol", "references"):
        if r.get(key) is not None and not isinstance(r[key], dict):
            raise Mgd3Error(f"{f}: {key} must be a mapping")
    refs = r.get("references") or {}
    for name in ("random_real", "full"):
        ref = refs.get(name)
        if ref is None:
            continue
        if not isinstance(ref, dict):
            raise Mgd3Error(f"{f}: references.{name} must be a mapping")
        _number(ref.get("mean"), f"references.{name}.mean", f)
        _number(ref.get("ipc"), f"references.{name}.ipc", f)
    _number((r.get("set") or {}).get("ipc"), "set.ipc", f)
    if r.get("seeds") is not None and not isinstance(r["seeds"], list):
        raise Mgd3Error(f"{f}: seeds must be a list")


def read_evals(root: Path) -> list[dict]:
    """DIR/eval.json (the latest evaluation) and DIR/evals/*.json (one per protocol/arch/epochs),
    without duplicates; each with "file" added."""
    from mgd3.io.store import inside

    out, seen = [], set()
    files = [root / "eval.json"] + sorted((root / "evals").glob("*.json"))
    for f in files:
        if not f.exists():
            continue  # a FIFO or device is refused by the reader, not skipped
        inside(root, str(f.relative_to(root)), "evaluation results")  # no symlink out of the set (evals/ too)
        r = _read_json(f)
        if not str(r.get("format", "")).startswith("mgd3-eval/") or "mean" not in r:
            raise Mgd3Error(f"{f} is not an mgd3 evaluation result (format {str(r.get('format'))[:40]!r})")
        _check_eval(r, f)
        if _eval_key(r) in seen:
            continue
        seen.add(_eval_key(r))
        out.append({**r, "file": str(f)})
    return out


def read_sets(dirs: list[str], data: str | None = None) -> list[SetInfo]:
    """The distilled sets (manifest + evaluations, read by `mgd3.io.set_reader.read_set`); one data set only."""
    from mgd3.io.set_reader import read_set

    sets: list[SetInfo] = []
    seen: set[Path] = set()
    for d in dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise Mgd3Error(f"distilled set {d} does not exist or is not a folder")
        if root.resolve() in seen:
            raise Mgd3Error(f"distilled set {d} is given twice")
        seen.add(root.resolve())
        ds = read_set(root, allow_image_folder=False)
        m = ds.manifest
        for key in ("data", "model", "config", "timing_s"):
            if m.get(key) is not None and not isinstance(m[key], dict):
                raise Mgd3Error(f"{root}/manifest.json: {key} must be a mapping")
        if (m.get("data") or {}).get("name") is not None and not isinstance(m["data"]["name"], str):
            raise Mgd3Error(f"{root}/manifest.json: data.name must be a string")
        files = {str(im["path"]): f for im, f in zip(m["images"], ds.files)}
        sets.append(SetInfo(root, "", m, read_evals(root), files))
    names = {s.data_name for s in sets}
    if len(names) > 1:
        listing = ", ".join(f"{s.path} ({s.data_name})" for s in sets)
        raise Mgd3Error(f"the sets are of different datasets and cannot share a report: {listing}")
    if data is None and names == {None}:
        raise Mgd3Error("the manifests do not name their data set: pass --data")
    used: dict[str, int] = {}
    for s in sets:  # unique labels: the folder name, numbered when two folders share it
        base = s.path.resolve().name or "set"
        used[base] = used.get(base, 0) + 1
        s.label = base if used[base] == 1 else f"{base}-{used[base]}"
    return sets


# --------------------------------------------------------------------------- accuracy rows


def _r2(v) -> float | None:
    return None if v is None else round(float(v), 2)


def _cached_references(r: dict, ipc, cache_dir=None) -> dict:
    """The references an evaluation lacked when it ran, from the evaluation cache (`mgd3 evaluate`
    of a later set, or `--reference`, may have trained them since): same data, protocol and IPC."""
    from mgd3.evaluation.references import find_cached

    refs = dict(r.get("references") or {})
    fp = (r.get("data") or {}).get("train_fingerprint")
    p = r.get("protocol")
    if not isinstance(fp, str) or not isinstance(p, dict):
        return refs
    for kind, key, want_ipc in (("random-real", "random_real", ipc), ("full", "full", None)):
        if refs.get(key) is None:
            d = find_cached(kind, fp, p, ipc=want_ipc, cache_dir=cache_dir)
            if d is not None and isinstance(d.get("mean"), (int, float)) and not isinstance(d.get("mean"), bool):
                refs[key] = {"mean": float(d["mean"]), "ipc": d.get("ipc"), "cache_file": d.get("cache_file")}
    return refs


def train_missing_random_real(s: SetInfo, cfg: ReportConfig) -> None:
    """An evaluation of the set without its random-real reference (an older mgd3, `--no-reference`):
    train and cache it with the evaluation's own settings (`mgd3 evaluate --reference random-real`
    with its data, classes, IPC, protocol and seeds). A failure is a warning: the row stays empty."""
    from mgd3.evaluation.core import EvalConfig, evaluate

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    own = ("set_dir", "reference", "ipc", "data", "classes", "out", "progress", "random_real", "cache_dir")
    for r in s.evals:
        ipc = (r.get("set") or {}).get("ipc", s.ipc)
        if r.get("kind", "distilled") != "distilled" or not isinstance(ipc, int) or isinstance(ipc, bool) \
                or _cached_references(r, ipc, cfg.cache_dir).get("random_real") is not None:
            continue
        name, ids = (r.get("data") or {}).get("name"), (r.get("set") or {}).get("class_ids")
        config = r.get("config") if isinstance(r.get("config"), dict) else {}
        if not isinstance(name, str) or not isinstance(ids, list):
            continue
        values = {k: v for k, v in config.items() if k in names and k not in own}
        log.info("%s: no random-real reference for its %s evaluation at IPC %d is cached: training it now "
                 "(about %s s, the set's own training time; --no-reference skips it)", s.label,
                 (r.get("protocol") or {}).get("name"), ipc, _fmt(r.get("train_seconds"), ".0f"))
        try:
            evaluate(EvalConfig(**values, reference="random-real", ipc=ipc, data=name, classes=[str(i) for i in ids],
                                random_real=False, progress=cfg.progress, cache_dir=cfg.cache_dir))
        except (Mgd3Error, TypeError, ValueError) as e:
            log.warning("%s: its random-real reference could not be trained (%s)", s.label, str(e)[:200])


def accuracy_rows(s: SetInfo, cache_dir=None) -> list[dict]:
    """One row per evaluation of the set (docs/METHODS.md §6.1 numbers); [] when it was never evaluated.
    A reference missing from an eval.json is looked up in the evaluation cache."""
    rows = []
    for r in s.evals:
        refs = _cached_references(r, (r.get("set") or {}).get("ipc", s.ipc), cache_dir)
        rr = (refs.get("random_real") or {}).get("mean")
        rr_ipc = (refs.get("random_real") or {}).get("ipc")
        ipc = (r.get("set") or {}).get("ipc", s.ipc)
        if rr is not None and rr_ipc is not None and int(rr_ipc) != int(ipc):
            rr = None  # a reference of another IPC is no reference
        full = (refs.get("full") or {}).get("mean")
        mean = float(r["mean"])
        p = r.get("protocol") or {}
        rows.append({
            "set": s.label, "method": (r.get("set") or {}).get("method") or s.method, "ipc": ipc,
            "seed": (r.get("set") or {}).get("generation_seed", s.manifest.get("seed")),
            "protocol": p.get("name"), "epochs": p.get("epochs"), "arch": r.get("arch"),
            "reported": r.get("reported"), "eval_seeds": r.get("seeds"),
            "mean": _r2(mean), "std": _r2(r.get("std")),
            "random_real": _r2(rr), "ior": _r2(mean - rr) if rr is not None else None,
            "full": _r2(full), "recovery": round(mean / full, 4) if full else None,
            "hlr": _r2(full - mean) if full is not None else None,
            "lrs": lrs(mean - rr, full - mean) if rr is not None and full is not None else None,
            "eval_seconds": _r2(r.get("train_seconds")), "file": r.get("file"),
        })
    # ARS pairs the set's IOR with augmentation (dc-dsa) and without (dc), same IPC and architecture
    for row in rows:
        pair = {x["protocol"]: x["ior"] for x in rows if x["ipc"] == row["ipc"] and x["arch"] == row["arch"]
                and x["ior"] is not None}
        row["ars"] = ars(pair["dc-dsa"], pair["dc"]) if "dc" in pair and "dc-dsa" in pair else None
    return rows


# --------------------------------------------------------------------------- latents


class LatentSource:
    """Backends, real data and real latents, loaded once per (model, data, classes, subset)."""

    def __init__(self, cfg: ReportConfig):
        self.cfg = cfg
        self._backends: dict[str, object] = {}
        self._real: dict[tuple, tuple] = {}  # key -> (backend, data, real latents)

    def backend(self, model: str):
        from mgd3.backends import load_backend

        if model not in self._backends:
            device = resolve_device(self.cfg.device)
            self._backends[model] = load_backend(model, device=device)
        return self._backends[model]

    def real(self, s: SetInfo) -> tuple[object, dict[str, np.ndarray], int | None]:
        """(backend, {class id: (N_c, D) real latents}, max_real_per_class used)."""
        from mgd3.io.data import load_data
        from mgd3.core.encode import real_latents

        from mgd3.io.data import DATASETS
        from mgd3.io.set_reader import named_outside

        m = s.manifest
        config = m.get("config") or {}
        model = set_model(s)
        n_max = self.cfg.max_real_per_class
        if n_max is None:
            n_max = config.get("max_real_per_class")
        d = m.get("data") or {}
        name = self.cfg.data or d.get("name")
        data_root = None
        if not self.cfg.data:  # what the manifest names is read only inside the set (issue 32)
            if isinstance(name, str) and name not in DATASETS:
                name = named_outside(s.path, name, "the data folder", f"--data {name}")
            data_root = named_outside(s.path, d.get("data_root"), "the data root",
                                      f"--data {d.get('name')}:{d.get('data_root')}")
        class_map = config.get("class_map")
        if class_map is not None:  # labels do not change latents: an outside map is not read, only said
            try:
                class_map = named_outside(s.path, class_map, "the class map", "")
            except Mgd3Error:
                log.warning("%s/manifest.json names a class map outside the set; not read", s.path)
                class_map = None
        key = (str(model), name, json.dumps(d.get("classes")), data_root, n_max)
        if key not in self._real:
            backend = self.backend(str(model))
            # the classes the set was distilled with, so the data fingerprint (and the encoding cache) match
            data = load_data(name, "train", resolution=backend.resolution, channels=backend.image_channels,
                             classes=d.get("classes"), data_root=data_root, class_map=class_map)
            # the very subset and encodings the methods used
            lat = real_latents(backend, data, range(len(data.class_ids)), max_per_class=n_max,
                               batch_size=self.cfg.encode_batch_size, cache_dir=self.cfg.cache_dir,
                               progress=self.cfg.progress)
            self._real[key] = (backend, data, lat)
        backend, data, lat = self._real[key]
        real = {cid: lat[c].numpy().reshape(len(lat[c]), -1) for c, cid in enumerate(data.class_ids)}
        return backend, real, n_max

    def distilled(self, s: SetInfo, backend) -> dict[str, np.ndarray]:
        """{class id: (n_c, D)} latents of the set: latents.pt, else the images encoded by the VAE."""
        import torch

        recs = s.manifest["images"]
        by_path = {str(r["path"]): str(r["class_id"]) for r in recs}
        f = s.path / "latents.pt"
        if f.is_file():
            from mgd3.io.set_reader import read_latents

            obj = read_latents(s.path)
            lat = obj["latents"].numpy()  # (N, C, h, w)
            paths = obj.get("paths") or [r["path"] for r in recs]
            if len(paths) != len(lat):
                raise Mgd3Error(f"{f}: {len(lat)} latents but {len(paths)} paths")
            cids = [by_path.get(str(p)) for p in paths]
            if None in cids:
                raise Mgd3Error(f"{f} names an image that manifest.json does not list")
        else:
            from mgd3.io.sources import read_image, to_model_space

            log.info("%s: no latents.pt, encoding its %d images with the VAE", s.path, len(recs))
            parts, bs = [], self.cfg.encode_batch_size
            with torch.no_grad():
                for i in range(0, len(recs), bs):
                    x = torch.stack([to_model_space(read_image(s.files[str(r["path"])], backend.image_channels,
                                                               backend.resolution),
                                                    backend.resolution, backend.image_channels)
                                     for r in recs[i:i + bs]])  # (B, C, R, R) in [-1, 1]
                    parts.append(backend.encode(x).float().cpu().numpy())  # (B, c, h, w)
            lat = np.concatenate(parts)
            cids = [str(r["class_id"]) for r in recs]
        flat = lat.reshape(len(lat), -1)
        out: dict[str, list] = {}
        for cid, v in zip(cids, flat):
            out.setdefault(cid, []).append(v)
        return {cid: np.stack(v) for cid, v in out.items()}


def set_metrics(distilled: dict[str, np.ndarray], real: dict[str, np.ndarray], ipc: int,
                neighbors: int = 50) -> dict:
    """Per-class diversity, representativeness and mode coverage, and their means over classes."""
    from mgd3.core.modes import find_modes

    per_class = {}
    for cid, d in distilled.items():
        r = real.get(cid)
        if r is None or len(r) == 0:
            raise Mgd3Error(f"class {cid!r} of the set has no real images in the data")
        k = min(ipc, len(r))
        modes = find_modes("kmeans", r, k, seed=0).modes  # (k, D), exactly mgd3's modes (random_state 0)
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


# --------------------------------------------------------------------------- figures


def _matplotlib_home(cache_dir=None) -> None:
    """matplotlib keeps its font cache and config in MPLCONFIGDIR, else ~/.config and ~/.cache:
    put it under mgd3's cache (a temporary folder when that is not writable), unless set."""
    import os
    import tempfile

    from mgd3.files import cache_root

    if os.environ.get("MPLCONFIGDIR"):
        return
    d = cache_root(cache_dir) / "matplotlib"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise PermissionError
    except OSError:
        d = Path(tempfile.mkdtemp(prefix="mgd3-matplotlib-"))
    os.environ["MPLCONFIGDIR"] = str(d)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    return [cmap(i % cmap.N if n <= 20 else i / max(n, 1)) for i in range(n)]


def plot_embedding(path: Path, distilled: dict[str, np.ndarray], real: dict[str, np.ndarray],
                   names: dict[str, str], method: str, title: str, plot_real_per_class: int) -> str:
    """Distilled (large) and real (small, faint) latents in one 2-D embedding, colour = class."""
    rng = np.random.default_rng(0)
    cids = list(distilled)
    xs, kinds, cls = [], [], []
    for ci, cid in enumerate(cids):
        r = real.get(cid, np.zeros((0, distilled[cid].shape[1])))
        if len(r) > plot_real_per_class:
            r = r[np.sort(rng.choice(len(r), size=plot_real_per_class, replace=False))]
        for arr, kind in ((r, 0), (distilled[cid], 1)):
            xs.append(arr)
            kinds += [kind] * len(arr)
            cls += [ci] * len(arr)
    x = np.concatenate(xs)
    xy, used = embed(method, x, seed=0)
    kinds, cls = np.asarray(kinds), np.asarray(cls)
    plt = _plt()
    colors = _colors(len(cids))
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    for ci, cid in enumerate(cids):
        sel = (cls == ci) & (kinds == 0)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=5, alpha=0.25, color=colors[ci], linewidths=0)
    for ci, cid in enumerate(cids):
        sel = (cls == ci) & (kinds == 1)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=70, marker="*", color=colors[ci], edgecolors="black",
                   linewidths=0.6, label=names.get(cid, cid))
    if len(cids) <= 20:
        ax.legend(fontsize=7, loc="best", title="class (★ distilled, · real)", title_fontsize=7)
    ax.set_title(f"{title} — {'t-SNE' if used == 'tsne' else 'PCA'} of VAE latents", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return used


def plot_div_rep(path: Path, results: list[tuple[str, dict]]) -> None:
    """Per class (small markers, labelled with the class id) and per set (large hollow marker, the
    mean over classes): diversity on x, representativeness on y."""
    plt = _plt()
    colors = _colors(len(results))
    markers = "osD^vP*Xh<>p"
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    for i, (label, met) in enumerate(results):
        pc = met["per_class"]
        x = [c["diversity"] for c in pc.values()]
        y = [c["representativeness"] for c in pc.values()]
        ax.scatter(x, y, s=30, marker=markers[i % len(markers)], color=colors[i], alpha=0.8,
                   label=f"{label} ({met.get('method', '?')})" if met.get("method") else label)
        if len(pc) <= 20:
            for cid, xi, yi in zip(pc, x, y):
                if not (math.isnan(xi) or math.isnan(yi)):
                    ax.annotate(cid, (xi, yi), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.scatter([met["diversity"]], [met["representativeness"]], s=160, marker=markers[i % len(markers)],
                   facecolors="none", edgecolors=colors[i], linewidths=2)
    ax.set_xlabel("diversity (1 − mean pairwise cosine similarity)")
    ax.set_ylabel("representativeness (mean cosine sim. to k nearest real)")
    ax.set_title("Diversity vs representativeness per class (VAE latents; large hollow = set mean)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- document (md + html)


class Doc:
    """A few block kinds rendered to both Markdown and HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: list[str]):
        self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list]):
        self.blocks.append(("table", headers, [["" if v is None else str(v) for v in r] for r in rows]))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {it}" for it in b[1]))
            elif b[0] == "table":
                esc = lambda s: s.replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(map(esc, b[1])) + " |", "|" + "---|" * len(b[1])]
                lines += ["| " + " | ".join(map(esc, r)) + " |" for r in b[2]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
               "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
               "td,th{border:1px solid #bbb;padding:3px 7px;text-align:left}th{background:#eee}"
               "img{max-width:100%;border:1px solid #ddd;image-rendering:pixelated}"
               "figure{display:inline-block;margin:0.5em}figcaption{font-size:12px;color:#555}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline_html(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline_html(it)}</li>" for it in b[1]) + "</ul>")
            elif b[0] == "table":
                rows = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in b[2])
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>" + rows + "</table>")
            elif b[0] == "img":
                data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{e(b[2])}'>"
                           f"<figcaption>{e(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Markdown `code` and **bold** in a paragraph -> HTML (the rest escaped)."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _fmt(v, spec: str = ".2f", missing: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "set"


def _jsonable(x):
    """NaN -> None (strict JSON), numpy scalars -> Python numbers, Paths -> str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


# --------------------------------------------------------------------------- the report


def report(cfg: ReportConfig) -> dict:
    """Read the sets, compute every number and figure, write report.md/html/json; returns report.json."""
    import torch
    from threadpoolctl import threadpool_limits

    validate_report(cfg)
    if cfg.threads is None:
        return _report(cfg)
    before = torch.get_num_threads()
    # on a busy shared CPU, OpenMP oversubscription makes t-SNE several times slower than one thread
    torch.set_num_threads(cfg.threads)
    try:
        with threadpool_limits(cfg.threads):
            return _report(cfg)
    finally:
        torch.set_num_threads(before)


GRID_PER_CLASS = 10  # images per class in a set's grid
COMPARE_PER_CLASS = 5  # images per class and set in the side-by-side comparison


def set_grid_rows(s: SetInfo, per_class: int = GRID_PER_CLASS) -> tuple[list[str], dict[str, np.ndarray]]:
    """(class names in the manifest's order, {class id: the first `per_class` images (n, R, R[, 3])
    uint8 of the class by index}) read from the set's own checked image files (never its grid.png,
    which may be of any size, or older and unlabelled). Images of another size than the class's
    first are brought to its size (nearest)."""
    from mgd3.io.sources import read_image

    chosen: dict[str, list] = {}
    for im in sorted(s.manifest["images"], key=lambda r: (str(r["class_id"]), _index(r.get("index")))):
        fs = chosen.setdefault(str(im["class_id"]), [])
        if len(fs) < per_class and str(im["path"]) in s.files:
            fs.append(s.files[str(im["path"])])
    channels = 3 if any(_is_color(fs[0]) for fs in chosen.values() if fs) else 1
    names, rows = [], {}
    for c in s.manifest["classes"]:
        cid = str(c["class_id"])
        if not chosen.get(cid):
            continue
        imgs = [read_image(f, channels).permute(1, 2, 0).numpy() for f in chosen[cid]]  # (R, R, C) uint8
        h, w = imgs[0].shape[:2]
        imgs = [a if a.shape[:2] == (h, w) else _nearest(a, h, w) for a in imgs]
        arr = np.stack(imgs)
        rows[cid] = arr[..., 0] if channels == 1 else arr
        names.append(str(c.get("name", cid)))
    return names, rows


def _index(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 1 << 62


def _is_color(f: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(f) as im:
            return im.mode not in ("L", "LA", "I", "I;16", "F", "1")
    except Exception:  # noqa: BLE001  (read_image reports an unreadable file with its name)
        return False


def _nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = (np.arange(h) * a.shape[0]) // h
    xs = (np.arange(w) * a.shape[1]) // w
    return a[ys][:, xs]


def write_set_grid(s: SetInfo, path: Path) -> None:
    """The set's grid: one row per class, named on the left, cells of at least 64 px."""
    from mgd3.io.grid import grid_image

    names, rows = set_grid_rows(s)
    grid_image([rows[cid] for cid in rows], names).save(path, format="PNG")


def write_comparison(sets: list[SetInfo], path: Path, per_class: int = COMPARE_PER_CLASS) -> None:
    """Several sets side by side: one row per class (of the first set, then the classes only the
    others have), one block of columns per set under its label."""
    from mgd3.io.grid import compare_image

    read = [set_grid_rows(s, per_class) for s in sets]
    order: dict[str, str] = {}
    for names, rows in read:
        for name, cid in zip(names, rows):
            order.setdefault(cid, name)
    blocks = []
    for _, rows in read:
        some = next(iter(rows.values()))
        blocks.append([rows.get(cid, some[:0]) for cid in order])
    compare_image(blocks, [s.label for s in sets], list(order.values())).save(path, format="PNG")


def _report(cfg: ReportConfig) -> dict:
    from tqdm.auto import tqdm

    if not cfg.sets:
        raise Mgd3Error("give at least one distilled set folder")
    EMBEDDINGS.get(cfg.embedding)  # unknown name -> one-line error listing the known ones
    if cfg.neighbors < 1:
        raise Mgd3Error(f"--neighbors must be at least 1, got {cfg.neighbors}")
    if cfg.max_real_per_class is not None and cfg.max_real_per_class < 1:
        raise Mgd3Error(f"--max-real-per-class must be at least 1, got {cfg.max_real_per_class}")
    if cfg.plot_real_per_class < 0:
        raise Mgd3Error(f"--plot-real-per-class must be at least 0, got {cfg.plot_real_per_class}")
    sets = read_sets(cfg.sets, cfg.data)
    _matplotlib_home(cfg.cache_dir)
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"report output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Mgd3Error(f"cannot create report folder {out} ({e.strerror or e})") from None

    source = LatentSource(cfg)
    entries = []
    for i, s in enumerate(tqdm(sets, desc="report", unit="set", disable=not cfg.progress)):
        slug = f"{i + 1:02d}-{_slug(s.label)}"
        if cfg.references:
            train_missing_random_real(s, cfg)
        entry = {"label": s.label, "path": str(s.path), "method": s.method, "ipc": s.ipc,
                 "seed": s.manifest.get("seed"), "data": s.manifest.get("data"), "model": s.manifest.get("model"),
                 "num_images": len(s.manifest.get("images") or []), "num_classes": len(s.manifest["classes"]),
                 "timing_s": s.manifest.get("timing_s") or {}, "accuracy": accuracy_rows(s, cfg.cache_dir),
                 "figures": {}}
        write_set_grid(s, out / f"grid-{slug}.png")
        entry["figures"]["grid"] = f"grid-{slug}.png"
        backend, real, n_max = source.real(s)
        distilled = source.distilled(s, backend)
        entry["max_real_per_class"] = n_max
        entry["metrics"] = set_metrics(distilled, real, s.ipc, cfg.neighbors)
        names = {str(c["class_id"]): str(c.get("name", c["class_id"])) for c in s.manifest["classes"]}
        f = out / f"embedding-{slug}.png"
        entry["embedding"] = plot_embedding(f, distilled, real, names, cfg.embedding,
                                            f"{s.label} ({s.method}, IPC {s.ipc})", cfg.plot_real_per_class)
        entry["figures"]["embedding"] = f.name
        entries.append(entry)
    figures = {"diversity_representativeness": "diversity_representativeness.png"}
    if len(sets) > 1:
        write_comparison(sets, out / "grids-side-by-side.png")
        figures["comparison"] = "grids-side-by-side.png"
    plot_div_rep(out / "diversity_representativeness.png",
                 [(e["label"], {**e["metrics"], "method": e["method"]}) for e in entries])

    result = {"format": REPORT_FORMAT, "mgd3_version": __version__,
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "data": cfg.data or sets[0].data_name, "definitions": {**DEFINITIONS, "k_neighbors": cfg.neighbors},
              "config": asdict(cfg), "sets": entries,
              "figures": figures}
    doc = _document(result, out)
    _write_text(out / "report.md", doc.markdown())
    _write_text(out / "report.html", doc.html(f"mgd3 report — {result['data']}"))
    _write_text(out / "report.json", json.dumps(_jsonable(result), indent=2, allow_nan=False))
    result["out"] = str(out)
    return result


def _per_class_rows(sets: list[dict], cids: list, cell) -> list[list[str]]:
    """One row per class id: the class, then cell(metrics) for each set ('' where the set lacks it)."""
    rows = []
    for c in cids:
        ms = [e["metrics"]["per_class"].get(c) for e in sets]
        rows.append([c] + ["" if m is None else cell(m) for m in ms])
    return rows


def _document(r: dict, out: Path) -> Doc:
    doc = Doc()
    sets = r["sets"]
    doc.h(1, f"mgd3 report — {r['data']}")
    doc.p(f"{len(sets)} distilled set(s); mgd3 {r['mgd3_version']}; {r['date']}. Numbers: `report.json`.")
    doc.ul([f"**{e['label']}**: `{e['path']}` — method {e['method']}, IPC {e['ipc']}, seed {e['seed']}, "
            f"{e['num_images']} images, {e['num_classes']} classes, model `{(e['model'] or {}).get('path')}`"
            for e in sets])

    doc.h(2, "1. Accuracy")
    doc.p("Mean ± std over evaluation seeds (from each set's `eval.json` / `evals/`). IOR = mean − random-real "
          "reference (same protocol and IPC); recovery = mean / full-data reference; HLR = full − mean; "
          "LRS = DD-Ranking 0.2's label-robust score (0.1 called it DDRS) (e^α − e^−1) / (e − e^−1), α = ½ IOR − ½ HLR "
          "in fractions of 1; ARS = its augmentation-robust score, the same with β = ½ IOR under dc-dsa + ½ IOR "
          "under dc (a set evaluated under both). "
          "`mgd3 evaluate` trains the random-real reference of a set's IPC when none is cached; a reference "
          "missing from an eval.json is taken from the evaluation cache (full: `mgd3 evaluate --reference full`).")
    rows = []
    for e in sets:
        if not e["accuracy"]:
            rows.append([e["label"], e["method"], e["ipc"], e["seed"], "not evaluated"] + [""] * 11)
        for a in e["accuracy"]:
            rows.append([e["label"], a["method"], a["ipc"], a["seed"], a["protocol"], a["arch"], a["epochs"],
                         f"{_fmt(a['mean'])} ± {_fmt(a['std'])}", " ".join(map(str, a["eval_seeds"] or [])),
                         _fmt(a["random_real"]), _fmt(a["ior"], "+.2f"), _fmt(a["full"]),
                         _fmt(None if a["recovery"] is None else 100 * a["recovery"], ".1f") +
                         (" %" if a["recovery"] is not None else ""), _fmt(a["hlr"]), _fmt(a["lrs"], ".4f"), _fmt(a["ars"], ".4f")])
    doc.table(["set", "method", "IPC", "seed", "protocol", "arch", "epochs", "acc % (mean ± std)", "eval seeds",
               "random real %", "IOR", "full %", "recovery", "HLR", "LRS", "ARS"], rows)

    doc.h(2, "2. Sample grids")
    if "comparison" in r["figures"]:
        doc.img(out / r["figures"]["comparison"],
                f"side by side: the first {COMPARE_PER_CLASS} images of each class (by index) of every set")
    for e in sets:
        if "grid" in e["figures"]:
            doc.img(out / e["figures"]["grid"], f"{e['label']}: {e['method']}, IPC {e['ipc']} (one row per class, "
                    f"the first {GRID_PER_CLASS} images by index)")
        else:
            doc.p(f"{e['label']}: no grid.png")

    doc.h(2, "3. Distilled vs real latents")
    doc.p("Per set, one 2-D embedding of the flattened VAE latents: real images of the class small and faint "
          f"(at most {r['config']['plot_real_per_class']} per class), distilled images as large stars; colour "
          "= class. t-SNE: sklearn, PCA initialisation, random_state 0, perplexity min(30, (n − 1)/3); PCA is "
          f"used instead with `--embedding pca` or for fewer than {TSNE_MIN_POINTS} points.")
    for e in sets:
        doc.img(out / e["figures"]["embedding"],
                f"{e['label']}: {'t-SNE' if e['embedding'] == 'tsne' else 'PCA'} "
                f"(real subset: {e['max_real_per_class'] or 'all'} per class)")

    d = r["definitions"]
    doc.h(2, "4. Diversity and representativeness")
    doc.p(f"Feature space: {d['feature_space']}.")
    doc.ul([f"**diversity** — {d['diversity']}",
            f"**representativeness** — {d['representativeness']}; K = {d['k_neighbors']}"])
    doc.img(out / r["figures"]["diversity_representativeness"], "diversity vs representativeness per class")
    doc.table(["set", "diversity (mean over classes)", "representativeness (mean over classes)"],
              [[e["label"], _fmt(e["metrics"]["diversity"], ".4f"), _fmt(e["metrics"]["representativeness"], ".4f")]
               for e in sets])
    cids = list(dict.fromkeys(c for e in sets for c in e["metrics"]["per_class"]))
    doc.p("Per class (diversity / representativeness):")
    doc.table(["class"] + [e["label"] for e in sets], _per_class_rows(
        sets, cids, lambda m: f"{_fmt(m['diversity'], '.3f')} / {_fmt(m['representativeness'], '.3f')}"))

    doc.h(2, "5. Mode coverage")
    doc.p(f"{d['mode_coverage']}.")
    doc.table(["set", "covered / modes (all classes)", "coverage (mean over classes)"],
              [[e["label"], f"{e['metrics']['covered']} / {e['metrics']['modes']}",
                _fmt(100 * e["metrics"]["coverage"], ".1f") + " %"] for e in sets])
    doc.table(["class"] + [e["label"] for e in sets],
              _per_class_rows(sets, cids, lambda m: f"{m['covered']}/{m['modes']}"))

    doc.h(2, "6. Timings (seconds)")
    keys = list(dict.fromkeys(k for e in sets for k in e["timing_s"]))
    doc.table(["set"] + [f"distill {k}" for k in keys] + ["evaluate (train, all seeds)"],
              [[e["label"]] + [_fmt(e["timing_s"].get(k), ".1f") for k in keys] +
               ["; ".join(f"{a['protocol']}/{a['arch']}: {_fmt(a['eval_seconds'], '.1f')}" for a in e["accuracy"])
                or "–"] for e in sets])
    doc.p("Distill timings from each manifest's `timing_s` (load, prepare = encoding + modes, generate, "
          "decode_write, total); evaluation seconds from `eval.json` (`train_seconds`, summed over seeds).")
    return doc


# --------------------------------------------------------------------------- CLI


# --- settings: rules and checks that need no data (the generic machinery is mgd3.config)


def _embedding_names():
    return EMBEDDINGS.names()


REPORT_RULES: dict[str, Rule] = {
    "embedding": Rule(choices=_embedding_names, what="embedding"), "max_real_per_class": POSITIVE,
    "plot_real_per_class": Rule(minimum=0, maximum=1_000_000), "neighbors": Rule(minimum=1, maximum=1_000_000),
    "encode_batch_size": Rule(minimum=1, maximum=1_000_000), "threads": Rule(minimum=1, maximum=4096),
}


def report_config(values: dict, source: str = "--config"):
    quiet = convert("quiet", values.pop("quiet", False), "bool", source)
    top = fill(ReportConfig, values, source, skip=("progress",))
    if not top.get("sets"):
        raise Mgd3Error("give at least one distilled set folder")
    cfg = ReportConfig(**top, progress=not quiet)
    validate_report(cfg)
    return cfg


def validate_report(cfg) -> None:
    check_types(cfg)
    check_rules(cfg, REPORT_RULES)
    check_device(cfg.device)
    check_cache_dir(cfg.cache_dir)


def add_parser(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "report", help="compare distilled sets: accuracy, grids, t-SNE, diversity/representativeness, coverage",
        description="Read distilled sets (DIR/manifest.json, latents.pt, grid.png, eval.json) and write "
                    "REPORT_DIR/report.md, a self-contained report.html, report.json and PNG figures: accuracy "
                    "with IOR and recovery of full-data accuracy, sample grids, a t-SNE of distilled vs real "
                    "VAE latents per set, per-class diversity vs representativeness, k-means mode coverage, "
                    "and stage timings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sets", nargs="*", metavar="DIR", help="distilled set folders written by `mgd3 distill`")
    p.add_argument("--out", default="report", metavar="REPORT_DIR", help="report folder (created; files replaced)")
    p.add_argument("--data", default=None, help="real data name or folder (default: the manifests' data)")
    p.add_argument("--embedding", default="tsne", choices=EMBEDDINGS.names(),
                   help="2-D embedding of the latents (t-SNE falls back to PCA for tiny inputs)")
    p.add_argument("--max-real-per-class", type=int, default=None, metavar="N",
                   help="real latents per class (fixed random subset, as in distill; default: the set's "
                        "own --max-real-per-class, else all)")
    p.add_argument("--plot-real-per-class", type=int, default=200, metavar="N",
                   help="real points per class drawn in the embedding")
    p.add_argument("--neighbors", type=int, default=50, metavar="K",
                   help="nearest real latents per distilled latent for representativeness")
    p.add_argument("--device", default="auto", help="VAE device: cpu, cuda, cuda:N or auto")
    p.add_argument("--encode-batch-size", type=int, default=64, help="images per VAE encoding batch")
    p.add_argument("--cache-dir", default=None, help="encoding cache (default $MGD3_CACHE_DIR or ~/.cache/mgd3)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for encoding, k-means and t-SNE (default: the libraries'; on a busy shared "
                        "CPU, 1 can be several times faster)")
    p.add_argument("--config", help="YAML file with any of these options (flag names without --); "
                                    "flags given on the command line win")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-reference", action="store_true",
                   help="do not train the random-real reference an evaluated set lacks (same data, IPC, protocol "
                        "and seeds as its evaluation; cached, as `mgd3 evaluate` trains it)")
    from mgd3.config import suppress_defaults

    suppress_defaults(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mgd3.config import convert, merged

    values, source = merged(args)
    no_reference = convert("no_reference", values.pop("no_reference", False), "bool", source)
    cfg = report_config(values, source)
    if no_reference:
        cfg = dataclasses.replace(cfg, references=False)
    r = report(cfg)
    evaluated = sum(1 for e in r["sets"] if e["accuracy"])
    cov = ", ".join(f"{e['label']} {100 * e['metrics']['coverage']:.0f} %" for e in r["sets"])
    print(f"report of {len(r['sets'])} set(s) ({evaluated} evaluated; mode coverage {cov}) -> "
          f"{r['out']}/report.md, report.html, report.json")
    return 0

