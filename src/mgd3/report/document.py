"""The report's documents: its sections as blocks rendered to Markdown and to a self-contained
HTML page (images embedded as base64), and its numbers as strict JSON."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import numpy as np

from mgd3.report.figures import COMPARE_PER_CLASS, GRID_PER_CLASS
from mgd3.report.metrics import TSNE_MIN_POINTS


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


def fmt(v, spec: str = ".2f", missing: str = "–") -> str:
    """`v` formatted by `spec` for a table cell; `missing` for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def jsonable(x):
    """NaN -> None (strict JSON), numpy scalars -> Python numbers, Paths -> str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _per_class_rows(sets: list[dict], cids: list, cell) -> list[list[str]]:
    """One row per class id: the class, then cell(metrics) for each set ('' where the set lacks it)."""
    rows = []
    for c in cids:
        ms = [e["metrics"]["per_class"].get(c) for e in sets]
        rows.append([c] + ["" if m is None else cell(m) for m in ms])
    return rows


def document(r: dict, out: Path) -> Doc:
    """The report of `r` (report.json's content) as one document; its figures are in `out`."""
    doc = Doc()
    sets = r["sets"]
    doc.h(1, f"mgd3 report — {r['data']}")
    doc.p(f"{len(sets)} distilled set(s); mgd3 {r['mgd3_version']}; {r['date']}. Numbers: `report.json`.")
    doc.ul([f"**{e['label']}**: `{e['path']}` — method {e['method']}, IPC {e['ipc']}, seed {e['seed']}, "
            f"{e['num_images']} images, {e['num_classes']} classes, model `{(e['model'] or {}).get('path')}`"
            for e in sets])
    _accuracy_section(doc, sets)
    _grids_section(doc, r, out)
    _embedding_section(doc, r, out)
    cids = list(dict.fromkeys(c for e in sets for c in e["metrics"]["per_class"]))
    _diversity_section(doc, r, out, cids)
    _coverage_section(doc, r, cids)
    _timings_section(doc, sets)
    return doc


def _accuracy_section(doc: Doc, sets: list[dict]) -> None:
    """1. Accuracy: one row per evaluation of each set (one 'not evaluated' row for a set without)."""
    doc.h(2, "1. Accuracy")
    doc.p("Mean ± std over evaluation seeds (from each set's `eval.json` / `evals/`). IOR = mean − random-real "
          "reference (same protocol and IPC); recovery = mean / full-data reference; HLR = full − mean; "
          "LRS = DD-Ranking 0.2's label-robust score (0.1 called it DDRS) (e^α − e^−1) / (e − e^−1), α = ½ IOR − ½ HLR "
          "in fractions of 1; ARS = its augmentation-robust score, the same with β = ½ IOR under dc-dsa + ½ IOR "
          "under dc (a set evaluated under both). "
          "`mgd3 evaluate` (and `mgd3 report`, for a set never evaluated) trains the random-real reference of a "
          "set's IPC when none is cached; a reference missing from an eval.json is taken from the evaluation cache "
          "(full: `mgd3 evaluate --reference full`, else the one mgd3 ships for its data, marked †).")
    rows, shipped = [], set()
    for e in sets:
        if not e["accuracy"]:
            rows.append([e["label"], e["method"], e["ipc"], e["seed"], "not evaluated"] + [""] * 11)
        for a in e["accuracy"]:
            rows.append([e["label"], a["method"], a["ipc"], a["seed"], a["protocol"], a["arch"], a["epochs"],
                         f"{fmt(a['mean'])} ± {fmt(a['std'])}", " ".join(map(str, a["eval_seeds"] or [])),
                         fmt(a["random_real"]), fmt(a["ior"], "+.2f"), fmt(a["full"]) + _dagger(a, shipped),
                         fmt(None if a["recovery"] is None else 100 * a["recovery"], ".1f") +
                         (" %" if a["recovery"] is not None else ""), fmt(a["hlr"]), fmt(a["lrs"], ".4f"), fmt(a["ars"], ".4f")])
    doc.table(["set", "method", "IPC", "seed", "protocol", "arch", "epochs", "acc % (mean ± std)", "eval seeds",
               "random real %", "IOR", "full %", "recovery", "HLR", "LRS", "ARS"], rows)
    for src in sorted(shipped):
        doc.p(f"† full-data reference {src}.")


def _dagger(a: dict, shipped: set) -> str:
    """' †' for a row whose full-data reference is the one mgd3 ships (its source noted in `shipped`)."""
    src = a.get("full_source")
    if a.get("full") is None or not isinstance(src, str) or not src.startswith("shipped with mgd3"):
        return ""
    shipped.add(src)
    return " †"


def _grids_section(doc: Doc, r: dict, out: Path) -> None:
    """2. Sample grids: the sets side by side (several sets), then each set's grid."""
    doc.h(2, "2. Sample grids")
    if "comparison" in r["figures"]:
        doc.img(out / r["figures"]["comparison"],
                f"side by side: the first {COMPARE_PER_CLASS} images of each class (by index) of every set")
    for e in r["sets"]:
        if "grid" in e["figures"]:
            doc.img(out / e["figures"]["grid"], f"{e['label']}: {e['method']}, IPC {e['ipc']} (one row per class, "
                    f"the first {GRID_PER_CLASS} images by index)")
        else:
            doc.p(f"{e['label']}: no grid.png")


def _embedding_section(doc: Doc, r: dict, out: Path) -> None:
    """3. Distilled vs real latents: each set's 2-D embedding."""
    doc.h(2, "3. Distilled vs real latents")
    doc.p("Per set, one 2-D embedding of the flattened VAE latents: real images of the class small and faint "
          f"(at most {r['config']['plot_real_per_class']} per class), distilled images as large stars; colour "
          "= class. t-SNE: sklearn, PCA initialisation, random_state 0, perplexity min(30, (n − 1)/3); PCA is "
          f"used instead with `--embedding pca` or for fewer than {TSNE_MIN_POINTS} points.")
    for e in r["sets"]:
        doc.img(out / e["figures"]["embedding"],
                f"{e['label']}: {'t-SNE' if e['embedding'] == 'tsne' else 'PCA'} "
                f"(real subset: {e['max_real_per_class'] or 'all'} per class)")


def _diversity_section(doc: Doc, r: dict, out: Path, cids: list) -> None:
    """4. Diversity and representativeness: the definitions, the figure, the means and the classes `cids`."""
    sets, d = r["sets"], r["definitions"]
    doc.h(2, "4. Diversity and representativeness")
    doc.p(f"Feature space: {d['feature_space']}.")
    doc.ul([f"**diversity** — {d['diversity']}",
            f"**representativeness** — {d['representativeness']}; K = {d['k_neighbors']}"])
    doc.img(out / r["figures"]["diversity_representativeness"], "diversity vs representativeness per class")
    doc.table(["set", "diversity (mean over classes)", "representativeness (mean over classes)"],
              [[e["label"], fmt(e["metrics"]["diversity"], ".4f"), fmt(e["metrics"]["representativeness"], ".4f")]
               for e in sets])
    doc.p("Per class (diversity / representativeness):")
    doc.table(["class"] + [e["label"] for e in sets], _per_class_rows(
        sets, cids, lambda m: f"{fmt(m['diversity'], '.3f')} / {fmt(m['representativeness'], '.3f')}"))


def _coverage_section(doc: Doc, r: dict, cids: list) -> None:
    """5. Mode coverage: the definition, the totals per set and the classes `cids`."""
    sets = r["sets"]
    doc.h(2, "5. Mode coverage")
    doc.p(f"{r['definitions']['mode_coverage']}.")
    doc.table(["set", "covered / modes (all classes)", "coverage (mean over classes)"],
              [[e["label"], f"{e['metrics']['covered']} / {e['metrics']['modes']}",
                fmt(100 * e["metrics"]["coverage"], ".1f") + " %"] for e in sets])
    doc.table(["class"] + [e["label"] for e in sets],
              _per_class_rows(sets, cids, lambda m: f"{m['covered']}/{m['modes']}"))


def _timings_section(doc: Doc, sets: list[dict]) -> None:
    """6. Timings: distill stages from the manifests, training seconds from the evaluations."""
    doc.h(2, "6. Timings (seconds)")
    keys = list(dict.fromkeys(k for e in sets for k in e["timing_s"]))
    doc.table(["set"] + [f"distill {k}" for k in keys] + ["evaluate (train, all seeds)"],
              [[e["label"]] + [fmt(e["timing_s"].get(k), ".1f") for k in keys] +
               ["; ".join(f"{a['protocol']}/{a['arch']}: {fmt(a['eval_seconds'], '.1f')}" for a in e["accuracy"])
                or "–"] for e in sets])
    doc.p("Distill timings from each manifest's `timing_s` (load, prepare = encoding + modes, generate, "
          "decode_write, total); evaluation seconds from `eval.json` (`train_seconds`, summed over seeds).")
