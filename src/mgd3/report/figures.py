"""The report's PNG figures: the 2-D embedding of distilled vs real latents, diversity vs
representativeness, each set's sample grid and the grids of several sets side by side."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mgd3.report.metrics import embed
from mgd3.report.sets import SetInfo

GRID_PER_CLASS = 10  # images per class in a set's grid
COMPARE_PER_CLASS = 5  # images per class and set in the side-by-side comparison


def matplotlib_home(cache_dir=None) -> None:
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
