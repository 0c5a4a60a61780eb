"""Report settings: `ReportConfig` and its rules, the checks that need no data (the generic
machinery is `mgd3.config`)."""

from __future__ import annotations

from dataclasses import dataclass

from mgd3.config import POSITIVE, Rule, check_cache_dir, check_device, check_rules, check_types, convert, fill
from mgd3.errors import Mgd3Error
from mgd3.report.metrics import EMBEDDINGS


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
    evaluate: bool = True  # evaluate a set that has no eval.json (`mgd3 evaluate DIR` with its defaults)


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
