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

Modules: `settings` (`ReportConfig` and its rules), `sets` (manifests, the model, eval.json read
back), `accuracy` (the rows of 1), `latents` (distilled and real VAE latents), `metrics` (3–5 on
arrays, with their definitions, and the 2-D embeddings), `figures` (the PNGs), `document`
(Markdown, HTML, JSON), `driver` (one run), `cli` (`mgd3 report`'s parser and command).
"""

from mgd3.report.accuracy import accuracy_rows
from mgd3.report.cli import add_parser, run
from mgd3.report.driver import report
from mgd3.report.metrics import (EMBEDDINGS, cosine_similarity, diversity, embed, mode_coverage, nearest_mode,
                                 representativeness, set_metrics)
from mgd3.report.sets import SetInfo, read_evals, set_model
from mgd3.report.settings import ReportConfig

__all__ = ["ReportConfig", "report", "add_parser", "run", "SetInfo", "read_evals", "set_model", "accuracy_rows",
           "EMBEDDINGS", "embed", "cosine_similarity", "diversity", "representativeness", "nearest_mode",
           "mode_coverage", "set_metrics"]
