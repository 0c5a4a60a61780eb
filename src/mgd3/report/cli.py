"""`mgd3 report`: its parser and the command, which fills a `ReportConfig` from the flags and the
`--config` YAML and runs the report."""

from __future__ import annotations

import dataclasses

from mgd3.report.driver import report
from mgd3.report.metrics import EMBEDDINGS
from mgd3.report.settings import report_config


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
    p.add_argument("--no-evaluate", action="store_true",
                   help="do not evaluate a set that has no eval.json (by default the report runs `mgd3 evaluate "
                        "DIR` on it: dc protocol, seeds 0 1 2, minutes per set on a CPU)")
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
    no_evaluate = convert("no_evaluate", values.pop("no_evaluate", False), "bool", source)
    cfg = report_config(values, source)
    cfg = dataclasses.replace(cfg, references=cfg.references and not no_reference,
                              evaluate=cfg.evaluate and not no_evaluate)
    r = report(cfg)
    evaluated = sum(1 for e in r["sets"] if e["accuracy"])
    cov = ", ".join(f"{e['label']} {100 * e['metrics']['coverage']:.0f} %" for e in r["sets"])
    print(f"report of {len(r['sets'])} set(s) ({evaluated} evaluated; mode coverage {cov}) -> "
          f"{r['out']}/report.md, report.html, report.json")
    return 0
