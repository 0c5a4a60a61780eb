"""A set's accuracy rows (docs/METHODS.md §6.1): mean ± std per evaluation, IOR over random real
images, recovery of full-data accuracy, HLR, and DD-Ranking's LRS and ARS; the references an
evaluation lacks are taken from the evaluation cache or trained."""

from __future__ import annotations

import dataclasses
import logging

from mgd3.errors import Mgd3Error
from mgd3.evaluation.scores import ars, lrs
from mgd3.report.document import fmt
from mgd3.report.sets import SetInfo
from mgd3.report.settings import ReportConfig

log = logging.getLogger(__name__)


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
                refs[key] = {"mean": float(d["mean"]), "ipc": d.get("ipc"), "cache_file": d.get("cache_file"),
                             "source": d.get("source")}
    return refs


def evaluate_never_evaluated(s: SetInfo, cfg: ReportConfig) -> None:
    """A set with no evaluation beside it: `mgd3 evaluate DIR` with evaluate's defaults (dc protocol,
    seeds 0 1 2), which writes DIR/eval.json and trains the random-real reference of its IPC when none
    is cached (unless the report skips references); then the evaluation is read back. A failure is a
    warning: the set's accuracy row says "not evaluated"."""
    from mgd3.evaluation.core import EvalConfig, evaluate
    from mgd3.report.sets import read_evals

    if s.evals:
        return
    ec = EvalConfig(set_dir=str(s.path), data=cfg.data, device=cfg.device, threads=cfg.threads,
                    cache_dir=cfg.cache_dir, random_real=cfg.references, progress=cfg.progress)
    log.info("%s has no evaluation: running `mgd3 evaluate %s` now (%s protocol, seeds %s; each seed's progress "
             "bar shows the time left; then its random-real reference, about as long again, unless cached; "
             "--no-evaluate skips both)", s.label, s.path, ec.protocol, " ".join(map(str, ec.seeds)))
    try:
        evaluate(ec)
        s.evals = read_evals(s.path)
    except (Mgd3Error, TypeError, ValueError) as e:
        log.warning("%s could not be evaluated (%s)", s.label, str(e)[:200])


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
                 (r.get("protocol") or {}).get("name"), ipc, fmt(r.get("train_seconds"), ".0f"))
        try:
            evaluate(EvalConfig(**values, reference="random-real", ipc=ipc, data=name, classes=[str(i) for i in ids],
                                random_real=False, progress=cfg.progress, cache_dir=cfg.cache_dir))
        except (Mgd3Error, TypeError, ValueError) as e:
            log.warning("%s: its random-real reference could not be trained (%s)", s.label, str(e)[:200])


def _full_source(ref) -> str | None:
    """Where a row's full-data reference comes from: a shipped measurement says so (with its
    command); a cached or recorded one is the cache file, if known."""
    if not isinstance(ref, dict):
        return None
    src = ref.get("source") or ref.get("cache_file")
    return " ".join(str(src).split())[:300] if src else None  # one line, bounded: eval.json is read from outside


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
            "full": _r2(full), "full_source": _full_source(refs.get("full")),
            "recovery": round(mean / full, 4) if full else None,
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
