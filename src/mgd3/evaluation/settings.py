"""The settings of `mgd3 evaluate`: `EvalConfig`'s rules, `--option KEY=VALUE` protocol overrides,
and every check that needs no data — done before anything loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mgd3.config import RANDOM_STATE_MAX, Rule, short, check_cache_dir, check_device, check_rules, check_types, convert, fill
from mgd3.errors import Mgd3Error


@dataclass
class EvalConfig:
    """Everything `mgd3 evaluate` takes; written (resolved) into eval.json."""

    set_dir: str | None = None  # the distilled set; None with `reference`
    data: str | None = None  # real data (default: the manifest's data name)
    protocol: str = "dc"
    arch: str | None = None  # default: the protocol's
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int | None = None  # override the protocol's
    batch_size: int | None = None
    resolution: int | None = None
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    reference: str | None = None  # "random-real" | "full"
    ipc: int | None = None  # for random-real
    classes: list[str] | None = None  # for references: a subset of the data's classes
    data_root: str | None = None
    class_map: str | None = None
    out: str | None = None  # default: SET/eval.json; for references only the cache (+ this file if given)
    cache_dir: str | None = None
    use_cache: bool = True
    teacher_epochs: int | None = None  # soft: override the teacher's epochs
    options: dict = field(default_factory=dict)  # other protocol fields, e.g. {"dsa_same_params": True}
    workers: int = 0  # image-loading processes for file data sets
    threads: int | None = None  # torch CPU threads while evaluating (None: torch's default)
    dist_mode: str = "auto"  # under torchrun: "seeds" (seeds over processes), "ddp" (one training over all) or auto
    checkpoint_s: float = 60.0  # at most one training checkpoint per this many seconds (0: every epoch)
    progress: bool = True
    random_real: bool = True  # a set: train its missing random-real reference (same protocol, IPC, seeds)


def _network_names():
    from mgd3.evaluation.networks import NETWORKS

    return NETWORKS.names()


EVAL_RULES: dict[str, Rule] = {
    "seeds": Rule(minimum=0, maximum=RANDOM_STATE_MAX), "epochs": Rule(minimum=1, maximum=1_000_000),
    "batch_size": Rule(minimum=1, maximum=1_000_000), "resolution": Rule(minimum=1, maximum=4096),
    "reference": Rule(choices=("random-real", "full")), "ipc": Rule(minimum=1, maximum=100_000),
    "teacher_epochs": Rule(minimum=1, maximum=1_000_000), "workers": Rule(minimum=0, maximum=1024),
    "threads": Rule(minimum=1, maximum=4096),
    "dist_mode": Rule(choices=("auto", "seeds", "ddp")), "checkpoint_s": Rule(minimum=0.0, maximum=1e9),
}


def eval_config(values: dict, options: dict, source: str = "--config", progress: bool = True,
                use_cache: bool = True):
    if isinstance(values.get("arch"), str):
        values = {**values, "arch": values["arch"].lower()}
    top = fill(EvalConfig, values, source, skip=("options", "progress", "use_cache"))
    cfg = EvalConfig(**top, options=check_protocol_options(options), progress=progress, use_cache=use_cache)
    validate_eval(cfg)
    return cfg


def validate_eval(cfg) -> None:
    from mgd3.evaluation.networks import NETWORKS
    from mgd3.evaluation.protocols import PROTOCOLS

    check_types(cfg, skip=("options",))
    check_rules(cfg, EVAL_RULES)
    PROTOCOLS.get(cfg.protocol)  # unknown names: one line listing the known ones
    if cfg.arch is not None:
        NETWORKS.get(cfg.arch.lower())
    if cfg.seeds is not None and len(cfg.seeds) == 0:
        raise Mgd3Error("give at least one evaluation seed")
    if len(cfg.seeds) > 1000:
        raise Mgd3Error(f"--seeds: at most 1000 evaluation seeds, got {len(cfg.seeds)}")
    check_device(cfg.device)
    check_cache_dir(cfg.cache_dir)
    if cfg.out is not None and Path(cfg.out).expanduser().is_dir():
        raise Mgd3Error(f"--out {cfg.out} is a folder; give a file name (e.g. {Path(cfg.out) / 'eval.json'})")
    if cfg.out is not None and Path(cfg.out).expanduser().exists() and not Path(cfg.out).expanduser().is_file():
        raise Mgd3Error(f"--out {cfg.out} exists and is not a regular file; it is not replaced")


PROTOCOL_RULES: dict[str, Rule] = {
    "epochs": Rule(minimum=1), "batch_size": Rule(minimum=1), "optimizer": Rule(choices=("sgd", "adamw")),
    "lr": Rule(above=0.0), "momentum": Rule(minimum=0.0, maximum=1.0), "weight_decay": Rule(minimum=0.0),
    "schedule": Rule(choices=("dc", "multistep", "rded-cosine", "cosine", "constant")),
    "normalize": Rule(choices=("dataset", "imagenet")), "augment": Rule(choices=("none", "dsa", "minimax", "crop-flip")),
    "report": Rule(choices=("last", "best")), "eval_every": Rule(minimum=0), "eval_after": Rule(minimum=0.0, below=1.0),
    "milestones": Rule(minimum=0.0, maximum=1.0), "gamma": Rule(minimum=0.0), "rrc_scale": Rule(above=0.0, maximum=1.0),
    "jitter": Rule(minimum=0.0), "lighting": Rule(minimum=0.0), "cutmix_beta": Rule(minimum=0.0),
    "loss": Rule(choices=("ce", "kl")), "temperature": Rule(above=0.0), "resolution": Rule(minimum=1, maximum=4096),
    "test_resize": Rule(above=0.0, maximum=8.0), "teacher_epochs": Rule(minimum=0), "teacher_batch_size": Rule(minimum=1),
    "teacher_lr": Rule(above=0.0), "arch": Rule(choices=_network_names),
}


def check_protocol_options(options: dict) -> dict:
    """`--option KEY=VALUE` values against the Protocol fields' types and ranges."""
    from mgd3.evaluation.protocols import Protocol

    fields = {f.name: f for f in dataclasses.fields(Protocol)}
    out = {}
    for k, v in options.items():
        if k == "dsa_same_params":
            out[k] = convert(k, v, "bool", "--option")
            continue
        if k not in fields or k == "name":
            known = sorted(set(fields) - {"name"} | {"dsa_same_params"})
            raise Mgd3Error(f"unknown protocol option {k!r} (--option); known: {', '.join(known)}")
        if k in ("dsa", "many_classes"):
            if not isinstance(v, dict):
                raise Mgd3Error(f"--option {k} must be a mapping, got {short(v)}")
            out[k] = v
            continue
        v = convert(k, v, fields[k].type, "--option")
        if k in PROTOCOL_RULES:
            PROTOCOL_RULES[k].check(f"--option {k}", v)
        out[k] = v
    if "dsa" in out:
        from mgd3.evaluation.protocols import DSAParams

        dfields = {f.name: f for f in dataclasses.fields(DSAParams)}
        bad = sorted(set(out["dsa"]) - set(dfields))
        if bad:
            raise Mgd3Error(f"unknown DSA option {bad[0]!r} (--option dsa); known: {', '.join(sorted(dfields))}")
        for k, v in out["dsa"].items():
            conv = convert(f"dsa.{k}", v, dfields[k].type, "--option")
            if isinstance(conv, float):
                Rule(minimum=0.0).check(f"--option dsa.{k}", conv)
    if "many_classes" in out:  # its overrides get the same checks ({lr: .nan}, {bogus: 1})
        if {"many_classes", "dsa"} & set(out["many_classes"]):
            raise Mgd3Error("--option many_classes cannot hold many_classes or dsa")
        out["many_classes"] = check_protocol_options({str(k): v for k, v in out["many_classes"].items()})
    return out
