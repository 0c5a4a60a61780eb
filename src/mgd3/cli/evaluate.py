"""`mgd3 evaluate`: train fresh networks on a distilled set (or a real-data reference) under a
protocol of the field and test them on the real test split. See `mgd3 evaluate --help`."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from typing import TYPE_CHECKING

from mgd3.errors import Mgd3Error

if TYPE_CHECKING:
    from mgd3.evaluation.core import EvalConfig

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="train networks on a distilled set and test them on real data",
        description="Train fresh networks on a distilled set (DIR/images/<NNN>-<class>/<k>.png + DIR/manifest.json, "
                    "or a plain ImageFolder) with hard labels, test them on the real test split of the same "
                    "classes, and write DIR/eval.json (per seed and mean ± std). With --reference, evaluate a "
                    "random real subset or the full real train split under the same protocol instead (cached).",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("set_dir", nargs="?", metavar="DISTILLED_DIR",
                   help="the distilled set folder (omit with --reference)")
    _what_flags(p.add_argument_group("what to evaluate"))
    _training_flags(p.add_argument_group("training"))
    _run_flags(p.add_argument_group("run"))
    p.set_defaults(func=run)


def _what_flags(g) -> None:
    from mgd3.evaluation.networks import NETWORKS
    from mgd3.evaluation.protocols import PROTOCOLS

    g.add_argument("--data", help="real data: fashion-mnist, digits, imagenette, ..., or an image folder "
                                  "(default: the data named in the set's manifest)")
    g.add_argument("--protocol", choices=PROTOCOLS.names(),
                   help="dc: ConvNet-3, 300 epochs, no augmentation; dc-dsa: 1000 epochs with DSA; minimax: "
                        "ResNetAP-10, ImageNet transforms + CutMix, best of periodic evaluations; soft: teacher "
                        "soft labels, KL loss, AdamW (default dc)")
    g.add_argument("--arch", type=str.lower, help=f"network: {', '.join(NETWORKS.names())} "
                                                  "(default: the protocol's)")
    g.add_argument("--reference", choices=["random-real", "full"],
                   help="evaluate a real-data reference instead of a set: random-real (IPC random real images "
                        "per class, subset i drawn with seed i) or full (the whole train split)")
    g.add_argument("--ipc", type=int, help="images per class of the random-real reference")
    g.add_argument("--no-reference", action="store_true",
                   help="a set: do not train its random-real reference (same data, IPC, protocol and seeds) when "
                        "none is cached; without it IOR and LRS stay empty")
    g.add_argument("--classes", nargs="+", metavar="CLASS", help="references: only these classes (ids or names)")
    g.add_argument("--data-root", help="ImageNet-1K root for the named ImageNet subsets "
                                       "(default: the manifest's)")
    g.add_argument("--class-map", help="file mapping class ids to labels (passed to the data loader)")


def _training_flags(g) -> None:
    g.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="evaluation seeds: network init, batch order and augmentation (default 0 1 2)")
    g.add_argument("--epochs", type=int, help="override the protocol's epochs (recorded in eval.json)")
    g.add_argument("--batch-size", type=int, help="override the protocol's training batch size")
    g.add_argument("--resolution", type=int, help="train/test resolution (default: the set's; minimax and "
                                                  "soft at most 224)")
    g.add_argument("--teacher-epochs", type=int, help="soft: epochs of the cached teacher (default 50)")
    g.add_argument("--dsa-same-params", action="store_true",
                   help="dc-dsa: one DSA parameter set for the whole batch (siamese mode) instead of per image "
                        "(what the DSA code does when training evaluation networks)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="set any other protocol field, e.g. --option cutmix_beta=0 (YAML value); repeatable")


def _run_flags(g) -> None:
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward passes")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (needs a C compiler on CPU)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; on a busy shared CPU, 1 "
                                               "can be several times faster than 2)")
    g.add_argument("--workers", type=int, help="image-loading processes for file data sets (default 0)")
    g.add_argument("--dist-mode", choices=["auto", "seeds", "ddp"],
                   help="under torchrun: seeds (each process trains whole seeds; same eval.json as one process), "
                        "ddp (each seed is one DistributedDataParallel training over all processes) or auto "
                        "(seeds when they divide evenly over the processes, else ddp for large batches)")
    g.add_argument("--checkpoint-s", type=float, metavar="SECONDS",
                   help="at most one training checkpoint per SECONDS (0: after every epoch); a killed run "
                        "resumes from it (default 60)")
    g.add_argument("--out", help="result file (default: DISTILLED_DIR/eval.json; references: cache only)")
    g.add_argument("--cache-dir", help="cache for references, teachers and statistics "
                                       "(default $MGD3_CACHE_DIR or ~/.cache/mgd3)")
    g.add_argument("--no-cache", action="store_true", help="recompute references / teacher even if cached")
    g.add_argument("--config", help="YAML file with any of these options (flag names without --); "
                                    "flags given on the command line win")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_options(items) -> dict:
    import yaml

    from mgd3 import safeio

    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise Mgd3Error(f"option must be a list of KEY=VALUE, got {items!r}"[:200])
    out = {}
    for it in items:
        k, sep, v = str(it).partition("=")
        if not sep or not k.strip():
            raise Mgd3Error(f"--option expects KEY=VALUE, got {it!r}")
        try:
            value = safeio.loads_yaml(v, f"--option {k.strip()}")  # bounded depth, digits, aliases
        except yaml.YAMLError:
            value = v
        if isinstance(value, str):  # YAML 1.1 reads 1e5, nan and inf as strings
            try:
                value = float(value)
            except ValueError:
                pass
        out[k.strip().replace("-", "_")] = value
    return out


def config_from_args(args) -> "EvalConfig":
    from mgd3.config import convert, merged
    from mgd3.evaluation.settings import eval_config

    values, source = merged(args)
    options = _parse_options(values.pop("option", None))
    if convert("dsa_same_params", values.pop("dsa_same_params", False), "bool", source):
        options["dsa_same_params"] = True
    quiet = convert("quiet", values.pop("quiet", False), "bool", source)
    no_cache = convert("no_cache", values.pop("no_cache", False), "bool", source)
    no_reference = convert("no_reference", values.pop("no_reference", False), "bool", source)
    if isinstance(values.get("seeds"), int) and not isinstance(values.get("seeds"), bool):
        values["seeds"] = [values["seeds"]]
    cfg = eval_config(values, options, source, progress=not quiet, use_cache=not no_cache)
    return dataclasses.replace(cfg, random_real=False) if no_reference else cfg


def summary_line(r: dict) -> str:
    p = r["protocol"]
    what = (f"{r['set']['num_images']} images ({r['set']['num_classes']} classes × IPC {r['set']['ipc']})"
            if r["kind"] == "distilled" else
            (f"random real, {r['set']['num_images']} images (IPC {r['ipc']}, subset seeds "
             f"{' '.join(map(str, r['subset_seeds']))})" if r["kind"] == "random-real"
             else f"full real train split, {r['set']['num_images']} images"))
    extra = ""
    if "ior" in r:
        extra += f"; IOR {r['ior']:+.2f}"
    if "hlr" in r:
        extra += f"; HLR {r['hlr']:.2f}"
    if "lrs" in r or "ddrs" in r:  # evaluations written before DD-Ranking 0.2's rename say ddrs
        extra += f"; LRS {r.get('lrs', r.get('ddrs')):.4f}"
    if "teacher" in r:
        extra += f"; teacher {r['teacher']['test_acc']:.2f} %"
    where = r.get("out") or r.get("cache_file")
    return (f"{p['name']} · {r['arch']} · {what}: {r['mean']:.2f} ± {r['std']:.2f} % over seeds "
            f"{' '.join(map(str, r['seeds']))} ({r['reported']}; {p['epochs']} epochs; {r['data']['name']} "
            f"test, {r['data']['test_images']} images{extra}) -> {where}")


def run(args) -> int:
    from mgd3.evaluation.core import evaluate
    from mgd3.run.ranks import launched

    # every process of a torchrun launch checks the flags: inside the launch, so a bad one is one line
    result = launched(lambda ranks: evaluate(config_from_args(args), ranks))
    if result:  # under torchrun, rank 0 reports
        print(summary_line(result))
    return 0

