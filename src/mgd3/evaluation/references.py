"""Stage: evaluation — real-data references under the same protocol (docs/METHODS.md §6.1) and the
soft-label teacher, each trained once and cached under the mgd3 cache directory.

* random-real: IPC real train images per class drawn with a fixed subset seed (subset i is
  drawn with `numpy.random.default_rng(subset seed i)`; evaluation seed i trains on subset i).
* full: the whole real train split of the same classes (epochs usually overridden on a CPU).
* teacher (protocol `soft`): the protocol's arch trained on the full real train split, its own
  test accuracy recorded next to its weights.

Cache layout: $MGD3_CACHE_DIR (default ~/.cache/mgd3)/eval/
    stats/<train fingerprint>.json                    dataset mean / std
    references/<kind>-<fingerprint>-<protocol>-<arch>-r<R>/<key>/seed-<s>.json and result.json
    teachers/<key>.pt                                 {"state_dict", "record"}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from mgd3 import files, safeio
from mgd3.errors import Mgd3Error
from mgd3.evaluation.protocols import Protocol, to_dict
from mgd3.evaluation.train import Normalization, RunOptions, TensorSet, dataset_normalization, train_and_test

log = logging.getLogger(__name__)

EVAL_CACHE_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The mgd3 cache (`mgd3.files.cache_root`) + /eval."""
    return files.cache_root(cache_dir) / "eval"


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_json_atomic(path: Path, obj) -> None:
    files.write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def cache_json(path: Path, obj) -> bool:
    """A cache record: a failed write warns once and the run goes on (`files.write_cache`)."""
    return files.cache_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path: Path) -> dict | None:
    """A cache record, or None when it is missing or unusable (bounded: `mgd3.safeio`)."""
    if not path.is_file():
        return None
    try:
        d = safeio.read_json(path, 16 << 20)
    except Mgd3Error:
        return None
    return d if isinstance(d, dict) else None


# --------------------------------------------------------------------------- normalisation


def cached_normalization(train_fingerprint: str, load_train, cache_dir=None, use_cache: bool = True) -> Normalization:
    """Mean / std of the real train split; `load_train()` -> TensorSet is called on a miss."""
    f = cache_root(cache_dir) / "stats" / f"{train_fingerprint}.json"
    d = read_json(f) if use_cache else None
    if d:
        return Normalization(tuple(d["mean"]), tuple(d["std"]), d["source"])
    norm = dataset_normalization(load_train())
    cache_json(f, {"mean": list(norm.mean), "std": list(norm.std), "source": norm.source})
    return norm


# --------------------------------------------------------------------------- subsets


def random_real_indices(targets: np.ndarray, num_classes: int, ipc: int, subset_seed: int) -> np.ndarray:
    """IPC items per class drawn without replacement (all of a class that has fewer)."""
    rng = np.random.default_rng(subset_seed)
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        out.append(np.sort(rng.choice(idx, size=min(ipc, len(idx)), replace=False)))
    return np.concatenate(out)


# --------------------------------------------------------------------------- reference runs


def reference_dir(kind: str, train_fp: str, p: Protocol, cache_dir=None) -> Path:
    return cache_root(cache_dir) / "references" / f"{kind}-{train_fp}-{p.name}-{p.arch}-r{p.resolution}"


def reference_key(kind: str, train_fp: str, test_fp: str, p: Protocol, seeds, ipc: int | None,
                  norm: Normalization) -> str:
    return key_of({"v": EVAL_CACHE_VERSION, "kind": kind, "train": train_fp, "test": test_fp,
                   "protocol": to_dict(p), "seeds": list(seeds), "ipc": ipc, "norm": [norm.mean, norm.std]})


def run_reference(kind: str, *, p: Protocol, seeds, ipc: int | None, train_fp: str, test_fp: str,
                  make_train, test: TensorSet, num_classes: int, norm: Normalization, opts: RunOptions,
                  teacher=None, cache_dir=None, use_cache: bool = True) -> tuple[list[dict], Path]:
    """Per-seed results of a reference, cached per seed. `make_train(seed)` -> TensorSet."""
    folder = reference_dir(kind, train_fp, p, cache_dir) / reference_key(kind, train_fp, test_fp, p, seeds, ipc, norm)
    runs = []
    for s in seeds:
        f = folder / f"seed-{s}.json"
        r = read_json(f) if use_cache else None
        if r is None:
            r = train_and_test(p, make_train(s), test, seed=s, num_classes=num_classes, norm=norm, opts=opts,
                               teacher=teacher)
            cache_json(f, r)
        else:
            log.info("%s reference, seed %d: from cache %s", kind, s, f)
        runs.append(r)
    return runs, folder


def find_reference(kind: str, train_fp: str, p: Protocol, *, ipc: int | None, cache_dir=None) -> dict | None:
    """The newest cached reference result for this data and protocol (any seeds; for `full`,
    any epochs); None if there is none."""
    return find_cached(kind, train_fp, to_dict(p), ipc=ipc, cache_dir=cache_dir)


# what may differ between a reference's protocol and the run's: the training length and batching
_LENGTH_KEYS = ("epochs", "eval_every", "batch_size")


def comparable(protocol: dict) -> dict:
    """A protocol without the settings that may differ between a reference and the run it serves."""
    return {k: v for k, v in protocol.items() if k not in _LENGTH_KEYS}


def find_cached(kind: str, train_fp: str, protocol: dict, *, ipc: int | None, cache_dir=None) -> dict | None:
    """`find_reference` for a protocol as eval.json records it (a dict)."""
    try:
        base = (cache_root(cache_dir) / "references"
                / f"{kind}-{train_fp}-{protocol['name']}-{protocol['arch']}-r{protocol['resolution']}")
    except (KeyError, TypeError):
        return None
    want = comparable(protocol)
    if not base.is_dir():
        return shipped_reference(kind, train_fp, want)
    best = None
    for f in base.glob("*/result.json"):
        d = read_json(f)
        if not d or (kind == "random-real" and d.get("ipc") != ipc):
            continue
        got = comparable(d.get("protocol", {}))
        if kind == "random-real" and d.get("protocol") != protocol:
            continue
        if got != want:
            continue
        if best is None or f.stat().st_mtime > best[0]:
            best = (f.stat().st_mtime, d, f)
    if best is None:
        return shipped_reference(kind, train_fp, want)
    d = dict(best[1])
    d["cache_file"] = str(best[2])
    return d


SHIPPED_REFERENCES = Path(__file__).with_name("shipped_references.json")


def shipped_reference(kind: str, train_fp: str, want: dict) -> dict | None:
    """The full-data reference mgd3 ships for a train split with this fingerprint (Fashion-MNIST as
    Debian's `dataset-fashion-mnist` packages it, all ten classes) under a protocol equal to `want`
    but for epochs, eval_every and batch size: what `mgd3 evaluate --reference full` would cache,
    measured once (docs/METHODS.md §6.1 says how), so that HLR and LRS need no hours of training on a
    CPU. None for other data, protocols and kinds; a cached reference always wins over it."""
    if kind != "full":
        return None
    records = safeio.read_json(SHIPPED_REFERENCES, 1 << 20)
    for d in records.get("full", []):
        got = comparable(d.get("protocol", {}))
        if (d.get("data") or {}).get("train_fingerprint") == train_fp and got == want:
            return {**d, "cache_file": None, "source": f"shipped with mgd3 ({d['command']})"}
    return None


# --------------------------------------------------------------------------- teacher


def teacher_protocol(p: Protocol) -> Protocol:
    """How the soft-label teacher is trained: the student's arch, resolution and normalisation;
    SGD (lr `teacher_lr`, momentum 0.9, wd 5e-4), cosine schedule, random-resized-crop + flip."""
    from dataclasses import replace

    return replace(p, name=f"{p.name}-teacher", epochs=p.teacher_epochs, batch_size=p.teacher_batch_size,
                   optimizer="sgd", lr=p.teacher_lr, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                   augment="crop-flip", report="last", eval_every=0, eval_after=0.0, cutmix_beta=0.0,
                   loss="ce", temperature=1.0, teacher_epochs=0, many_classes={})


def _load_teacher(f: Path, arch: str, num_classes: int, build_network):
    """(model, record) from a cached teacher file, or None (with a warning; it is trained again)
    when the file is truncated, foreign or not plain tensors + JSON."""
    try:
        blob = torch.load(f, map_location="cpu", weights_only=True)
        rec = safeio.loads_json(blob["record_json"], str(f))
        model = build_network(arch, int(rec["channels"]), num_classes, int(rec["resolution"]))
        model.load_state_dict(blob["state_dict"])
        float(rec["test_acc"])
        return model, rec
    except Exception as e:  # noqa: BLE001  (any unreadable cache entry is rebuilt, never fatal)
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        log.warning("cached teacher %s is unreadable (%s); training it again", f, first)
        return None


def get_teacher(p: Protocol, *, train_fp: str, test_fp: str, make_train, test: TensorSet, num_classes: int,
                norm: Normalization, opts: RunOptions, cache_dir=None, use_cache: bool = True,
                seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The cached teacher for protocol `p` (trained on the full train split on a miss)."""
    from mgd3.evaluation.networks import build_network

    tp = teacher_protocol(p)
    key = key_of({"v": EVAL_CACHE_VERSION, "train": train_fp, "test": test_fp, "protocol": to_dict(tp),
                  "seed": seed, "norm": [norm.mean, norm.std]})
    f = cache_root(cache_dir) / "teachers" / f"{key}.pt"
    train_shape = None
    if use_cache and f.is_file():
        cached = _load_teacher(f, tp.arch, num_classes, build_network)
        if cached is not None:
            model, rec = cached
            log.info("teacher %s from cache %s (test accuracy %.2f %%)", tp.arch, f, rec["test_acc"])
            return model.eval(), {**rec, "cache_file": str(f)}
    train = make_train()
    train_shape = tuple(train.images.shape)
    log.info("training the soft-label teacher (%s, %d epochs on %d real images)", tp.arch, tp.epochs, len(train))
    r = train_and_test(tp, train, test, seed=seed, num_classes=num_classes, norm=norm, opts=opts, return_model=True)
    model = r.pop("model")
    rec = {"arch": tp.arch, "epochs": tp.epochs, "train_images": train_shape[0], "channels": train_shape[1],
           "resolution": train_shape[-1], "test_acc": r["last_acc"], "train_seconds": r["train_seconds"],
           "seed": seed, "protocol": to_dict(tp)}
    state = {k: v.detach().cpu() for k, v in getattr(model, "_orig_mod", model).state_dict().items()}
    # plain tensors and a JSON string: read back with weights_only=True, nothing in it can run code
    if not files.cache_torch({"state_dict": state, "record_json": json.dumps(rec, default=str)}, f):
        return model.eval(), rec
    return model.eval(), {**rec, "cache_file": str(f)}
