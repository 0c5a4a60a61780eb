"""One `mgd3 report` run: read the sets, compute every number and figure, write report.md,
report.html and report.json."""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict
from pathlib import Path

from mgd3.errors import Mgd3Error
from mgd3.files import write_text_atomic
from mgd3.report.accuracy import accuracy_rows, evaluate_never_evaluated, train_missing_random_real
from mgd3.report.document import document, jsonable
from mgd3.report.figures import matplotlib_home, plot_div_rep, plot_embedding, write_comparison, write_set_grid
from mgd3.report.latents import LatentSource
from mgd3.report.metrics import DEFINITIONS, EMBEDDINGS, set_metrics
from mgd3.report.sets import SetInfo, read_sets
from mgd3.report.settings import ReportConfig, validate_report
from mgd3.version import __version__

REPORT_FORMAT = "mgd3-report/1"


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


def _report(cfg: ReportConfig) -> dict:
    from tqdm.auto import tqdm

    _check_values(cfg)
    sets = read_sets(cfg.sets, cfg.data)
    matplotlib_home(cfg.cache_dir)
    out = _output_folder(cfg.out)
    source = LatentSource(cfg)
    entries = [_set_entry(s, f"{i + 1:02d}-{_slug(s.label)}", cfg, source, out)
               for i, s in enumerate(tqdm(sets, desc="report", unit="set", disable=not cfg.progress))]
    for s, entry in zip(sets, entries):  # the long part last: every set's input was read and checked first
        if cfg.evaluate:
            evaluate_never_evaluated(s, cfg)
        if cfg.references:
            train_missing_random_real(s, cfg)
        entry["accuracy"] = accuracy_rows(s, cfg.cache_dir)
    figures = _set_figures(sets, entries, out)
    result = {"format": REPORT_FORMAT, "mgd3_version": __version__,
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "data": cfg.data or sets[0].data_name, "definitions": {**DEFINITIONS, "k_neighbors": cfg.neighbors},
              "config": asdict(cfg), "sets": entries,
              "figures": figures}
    _write_documents(result, out)
    result["out"] = str(out)
    return result


def _check_values(cfg: ReportConfig) -> None:
    """The settings a report run refuses before it reads any set."""
    if not cfg.sets:
        raise Mgd3Error("give at least one distilled set folder")
    EMBEDDINGS.get(cfg.embedding)  # unknown name -> one-line error listing the known ones
    if cfg.neighbors < 1:
        raise Mgd3Error(f"--neighbors must be at least 1, got {cfg.neighbors}")
    if cfg.max_real_per_class is not None and cfg.max_real_per_class < 1:
        raise Mgd3Error(f"--max-real-per-class must be at least 1, got {cfg.max_real_per_class}")
    if cfg.plot_real_per_class < 0:
        raise Mgd3Error(f"--plot-real-per-class must be at least 0, got {cfg.plot_real_per_class}")


def _output_folder(path: str) -> Path:
    """The report folder, created (a file in its place is refused)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"report output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Mgd3Error(f"cannot create report folder {out} ({e.strerror or e})") from None
    return out


def _set_entry(s: SetInfo, slug: str, cfg: ReportConfig, source: LatentSource, out: Path) -> dict:
    """One set's part of report.json — accuracy, metrics, embedding — with its grid and embedding
    figures written to `out` under `slug`."""
    entry = {"label": s.label, "path": str(s.path), "method": s.method, "ipc": s.ipc,
             "seed": s.manifest.get("seed"), "data": s.manifest.get("data"), "model": s.manifest.get("model"),
             "num_images": len(s.manifest.get("images") or []), "num_classes": len(s.manifest["classes"]),
             "timing_s": s.manifest.get("timing_s") or {}, "accuracy": [],  # filled in by _report
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
    return entry


def _set_figures(sets: list[SetInfo], entries: list[dict], out: Path) -> dict[str, str]:
    """The figures of all sets together (the grids side by side for several sets, diversity vs
    representativeness), written to `out`; their file names."""
    figures = {"diversity_representativeness": "diversity_representativeness.png"}
    if len(sets) > 1:
        write_comparison(sets, out / "grids-side-by-side.png")
        figures["comparison"] = "grids-side-by-side.png"
    plot_div_rep(out / "diversity_representativeness.png",
                 [(e["label"], {**e["metrics"], "method": e["method"]}) for e in entries])
    return figures


def _write_documents(result: dict, out: Path) -> None:
    """report.md, report.html and report.json of `result` in `out`."""
    doc = document(result, out)
    write_text_atomic(out / "report.md", doc.markdown())
    write_text_atomic(out / "report.html", doc.html(f"mgd3 report — {result['data']}"))
    write_text_atomic(out / "report.json", json.dumps(jsonable(result), indent=2, allow_nan=False))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "set"
