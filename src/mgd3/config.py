"""Configuration, done once for every sub-command: CLI flags and an optional YAML file fill one
typed dataclass per stage (`DistillConfig`, `EvalConfig`, `ReportConfig`, `PretrainConfig`) the
same way, and every value is checked before any file is written or any data or model loads.

- Types come from the dataclass annotations (`int`, `float | None`, `list[str] | None`, ...):
  a YAML `ipc: "ten"`, `ipc: 1.7`, `ipc: true` or `steps: [1, 2]` is one line naming the key and
  the type it needs. Unknown keys are refused with the known ones.
- Ranges, finiteness and choices live in one table per stage (`*_RULES`); a model's `mgd3.json`
  recommendations go through the same checks (`check_recommended`).
- Resources are checked before they are used: a device that is not there, a cache folder that is
  a file, an image size that does not fit in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mgd3.errors import Mgd3Error

SEED_MAX = 2**63 - 1  # torch and the per-image seeds take 64-bit seeds
RANDOM_STATE_MAX = 2**32 - 1  # numpy RandomState / scikit-learn random_state
MAX_RESOLUTION = 16384  # pixels per side: above any model mgd3 runs, below what breaks PIL/zlib


# --------------------------------------------------------------------------- YAML


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping of option: value (dashes in keys become underscores); one-line errors for a
    missing file, a folder, a binary file, invalid YAML or anything but a mapping."""
    import yaml

    p = Path(path).expanduser()
    if not p.exists():
        raise Mgd3Error(f"config file {path} does not exist")
    if p.is_dir():
        raise Mgd3Error(f"config file {path} is a folder, not a YAML file")
    try:
        if p.stat().st_size > 1 << 20:
            raise Mgd3Error(f"config file {path} is larger than 1 MiB; it is not an options file")
        text = p.read_bytes().decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise Mgd3Error(f"config file {path} is not a text (UTF-8) file") from None
    except OSError as e:
        raise Mgd3Error(f"cannot read config file {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"config file {path} is not valid YAML ({first})") from None
    except RecursionError:
        raise Mgd3Error(f"config file {path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Mgd3Error(f"config file {path} must hold a mapping of option: value, not a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# --------------------------------------------------------------------------- types


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _alternatives(annotation) -> list[str]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return [a.strip() for a in text.split("|")]


_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "None": "null", "dict": "a mapping", "list[str]": "a list of strings", "list[int]": "a list of integers",
          "tuple[float, ...]": "a list of numbers", "tuple[float, float]": "a pair of numbers"}


def expected(annotation) -> str:
    return " or ".join(_NAMES.get(a, a) for a in _alternatives(annotation))


def _convert_one(kind: str, v):
    """`v` as `kind`, or raise TypeError."""
    if kind == "None":
        if v is None:
            return None
    elif kind == "bool":
        if isinstance(v, bool):
            return v
    elif kind == "int":
        if isinstance(v, int) and not isinstance(v, bool):
            return int(v)
    elif kind == "float":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif kind == "str":
        if isinstance(v, str):
            return v
    elif kind == "dict":
        if isinstance(v, dict):
            return v
    elif kind in ("list[str]", "list[int]"):
        item = kind[5:-1]
        items = v if isinstance(v, (list, tuple)) else [v]
        out = []
        for x in items:
            if item == "str" and isinstance(x, (int, str)) and not isinstance(x, bool):
                out.append(str(x))  # class ids such as 0 read as numbers in YAML
            elif item == "int" and isinstance(x, int) and not isinstance(x, bool):
                out.append(int(x))
            else:
                raise TypeError
        return out
    elif kind.startswith("tuple[float"):
        if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            t = tuple(float(x) for x in v)
            if kind == "tuple[float, float]" and len(t) != 2:
                raise TypeError
            return t
    else:  # a type this layer does not know (a nested dataclass): leave it to its own checks
        return v
    raise TypeError


def convert(key: str, value, annotation, source: str = "") -> Any:
    """`value` converted to the annotated type, or a one-line Mgd3Error naming key and type."""
    for kind in _alternatives(annotation):
        try:
            return _convert_one(kind, value)
        except TypeError:
            continue
    where = f"{source}: " if source else ""
    raise Mgd3Error(f"{where}{key} must be {expected(annotation)}, got {_short(value)}")


def fill(cls, values: dict, source: str = "--config", skip: Iterable[str] = ()) -> dict:
    """Check every key of `values` against the fields of dataclass `cls` (types converted);
    returns the converted values. Unknown keys are an error listing the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    skip = set(skip)
    unknown = sorted(k for k in values if k not in fields or k in skip)
    if unknown:
        known = ", ".join(sorted(k for k in fields if k not in skip))
        raise Mgd3Error(f"unknown option {unknown[0]!r} in {source}; known: {known}")
    return {k: convert(k, v, fields[k].type, source) for k, v in values.items()}


def check_types(obj, skip: Iterable[str] = ()) -> None:
    """The fields of a config dataclass built in Python (the API) have their annotated types."""
    skip = set(skip)
    for f in dataclasses.fields(obj):
        if f.name not in skip:
            convert(f.name, getattr(obj, f.name), f.type, type(obj).__name__)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A check of one value: inclusive bounds (None: none), finiteness, choices."""

    minimum: float | None = None
    maximum: float | None = None
    below: float | None = None  # exclusive upper bound
    above: float | None = None  # exclusive lower bound
    choices: Callable[[], Iterable[str]] | tuple | None = None
    what: str | None = None  # the noun in "unknown <what> 'x'" (a registry's kind); default the flag

    def check(self, name: str, v) -> None:
        if v is None:
            return
        if isinstance(v, (list, tuple)):
            for x in v:
                self.check(name, x)
            return
        if self.choices is not None:
            known = list(self.choices() if callable(self.choices) else self.choices)
            if v not in known:
                raise Mgd3Error(f"unknown {self.what or name} {_short(v)}; known: {', '.join(map(str, known))}")
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if isinstance(v, float) and self.minimum is not None and (not math.isfinite(v) or v < self.minimum):
            raise Mgd3Error(f"{name} must be a finite number >= {self.minimum:g}, got {v}")
        if isinstance(v, float) and not math.isfinite(v):
            raise Mgd3Error(f"{name} must be a finite number, got {v}")
        if self.minimum is not None and v < self.minimum:
            raise Mgd3Error(f"{name} must be at least {self.minimum:g}, got {v}")
        if self.maximum is not None and v > self.maximum:
            raise Mgd3Error(f"{name} must be at most {self.maximum:g}, got {v}")
        if self.above is not None and not v > self.above:
            raise Mgd3Error(f"{name} must be greater than {self.above:g}, got {v}")
        if self.below is not None and not v < self.below:
            raise Mgd3Error(f"{name} must be less than {self.below:g}, got {v}")


POSITIVE = Rule(minimum=1)
NON_NEGATIVE = Rule(minimum=0)
SEED = Rule(minimum=0, maximum=SEED_MAX)
RESOLUTION = Rule(minimum=1, maximum=MAX_RESOLUTION)
FINITE_NON_NEGATIVE = Rule(minimum=0.0)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_rules(obj, rules: dict[str, Rule]) -> None:
    """Every rule whose field `obj` has, named by its flag."""
    for name, rule in rules.items():
        if hasattr(obj, name):
            rule.check(flag(name), getattr(obj, name))


def check_device(name: str | None, flag_name: str = "--device") -> None:
    """cpu, cuda, cuda:N, mps or auto, and there."""
    import torch

    if name is None or str(name).lower() == "auto":
        return
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise Mgd3Error(f"unknown {flag_name} {_short(name)}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Mgd3Error(f"{flag_name} {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Mgd3Error(f"{flag_name} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise Mgd3Error(f"{flag_name} {name}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise Mgd3Error(f"{flag_name} {name}: mgd3 runs on cpu, cuda or mps")


def check_cache_dir(path: str | None, flag_name: str = "--cache-dir") -> None:
    if path is None:
        path = os.environ.get("MGD3_CACHE_DIR") or None
        flag_name = "MGD3_CACHE_DIR" if path else flag_name
    if path is None:
        return
    p = Path(path).expanduser()
    for q in [p, *p.parents]:
        if q.exists():
            if not q.is_dir():
                raise Mgd3Error(f"{flag_name} {path}: {q} is a file, not a folder")
            break


def available_memory() -> int | None:
    """Bytes of memory this process can still use (available RAM), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str, hint: str) -> None:
    """Refuse work whose buffers (`need` bytes) would not fit in the available memory."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise Mgd3Error(f"{what} needs about {need / 2**30:.1f} GiB of memory, {avail / 2**30:.1f} GiB are "
                        f"available; {hint}")


# --------------------------------------------------------------------------- distill


def _method_names():
    from mgd3.methods import load_methods

    return load_methods().names()


def _sampler_names():
    from mgd3.sampling import UPDATE_RULES

    return UPDATE_RULES.names()


DISTILL_RULES: dict[str, Rule] = {
    "method": Rule(choices=_method_names, what="method"), "ipc": Rule(minimum=1, maximum=100_000), "seed": SEED,
    "batch_size": Rule(minimum=1, maximum=1_000_000), "encode_batch_size": Rule(minimum=1, maximum=1_000_000),
    "encode_workers": Rule(minimum=0, maximum=1024), "max_real_per_class": POSITIVE,
    "precision": Rule(choices=("fp32", "bf16", "fp16")), "resolution": RESOLUTION, "save_resolution": RESOLUTION,
}
SAMPLER_RULES: dict[str, Rule] = {
    "sampler": Rule(choices=_sampler_names, what="sampler"), "steps": Rule(minimum=1, maximum=100_000),
    "cfg": FINITE_NON_NEGATIVE, "cfg_channels": POSITIVE, "eta": FINITE_NON_NEGATIVE,
}


def method_option_fields() -> dict[str, dataclasses.Field]:
    """Every registered method's option fields by name (the first method's, when shared)."""
    from mgd3.methods import load_methods

    reg = load_methods()
    out: dict[str, dataclasses.Field] = {}
    for name in reg.names():
        opts = reg.get(name).Options
        for f in dataclasses.fields(opts) if opts else ():
            out.setdefault(f.name, f)
    return out


def option_choices(f: dataclasses.Field) -> list[str] | None:
    """The choices of an enumerated method option (its own, or a registry's for --modes)."""
    if f.metadata.get("choices"):
        return list(f.metadata["choices"])
    if f.name == "modes":
        from mgd3.modes import MODE_FINDERS

        return list(MODE_FINDERS.names())
    return None


def check_method_options(options: dict, source: str = "") -> dict:
    """Types, finiteness, seed ranges and choices of method options (by field name); returns
    them converted. What fits one method only (t_stop against the steps) is the method's check."""
    from mgd3.methods import option_flag

    fields = method_option_fields()
    out = {}
    for k, v in options.items():
        f = fields.get(k)
        if f is None:  # the method names what it does not take
            out[k] = v
            continue
        name = option_flag(f)
        v = convert(name if not source else name.lstrip("-"), v, f.type, source)
        choices = option_choices(f)
        if choices is not None:
            Rule(choices=tuple(choices), what="mode finder" if k == "modes" else None).check(name, v)
        elif k.endswith("seed"):
            Rule(minimum=0, maximum=RANDOM_STATE_MAX).check(name, v)
        elif isinstance(v, int) and not isinstance(v, bool):  # step indices, counts: what a run can use
            Rule(minimum=-1, maximum=1_000_000).check(name, v)
        elif isinstance(v, float):
            Rule(minimum=0.0).check(name, v)
        out[k] = v
    return out


def distill_config(values: dict, source: str = "--config"):
    """A DistillConfig from merged YAML + flag values (flag names with underscores; method options
    by their flag name or field name); one-line errors for unknown keys and wrong types."""
    from mgd3.distill import DistillConfig
    from mgd3.methods import SamplerConfig, option_flag

    opt_fields = method_option_fields()
    by_flag = {option_flag(f).lstrip("-").replace("-", "_"): name for name, f in opt_fields.items()}
    sampler_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    top_skip = {"sampler", "options", "progress"}
    top_fields = {f.name for f in dataclasses.fields(DistillConfig)} - top_skip
    sampler, options, top = {}, {}, {}
    quiet = False
    for k, v in values.items():
        if k.startswith("opt_"):
            options[k[4:]] = v
        elif k in by_flag or (k in opt_fields and k not in top_fields and k not in sampler_fields):
            options[by_flag.get(k, k)] = v
        elif k in sampler_fields:
            sampler[k] = v
        elif k in top_fields:
            top[k] = v
        elif k == "quiet":
            quiet = convert(k, v, "bool", source)
        else:
            known = sorted(top_fields | sampler_fields | set(by_flag) | {"quiet"})
            raise Mgd3Error(f"unknown option {k!r} in {source}; known: {', '.join(known)}")
    top = fill(DistillConfig, top, source, skip=top_skip)
    sampler = fill(SamplerConfig, sampler, source)
    options = check_method_options(options, source)
    for req in ("data", "out"):
        if req not in top:
            raise Mgd3Error(f"--{req} is required")
    cfg = DistillConfig(**top, progress=not quiet, sampler=SamplerConfig(**sampler), options=options)
    validate_distill(cfg)
    return cfg


def validate_distill(cfg) -> None:
    """Every check of a DistillConfig that needs no data and no model (the distill driver calls
    this first, so the Python API gets the same checks as the CLI)."""
    check_types(cfg, skip=("sampler", "options"))
    check_types(cfg.sampler)
    if not isinstance(cfg.options, dict):
        raise Mgd3Error(f"DistillConfig: options must be a mapping, got {_short(cfg.options)}")
    for k in ("data", "out"):
        if not isinstance(getattr(cfg, k), str) or not getattr(cfg, k).strip():
            raise Mgd3Error(f"--{k} must be a non-empty string")
    check_rules(cfg, DISTILL_RULES)
    check_rules(cfg.sampler, SAMPLER_RULES)
    check_method_options(cfg.options)
    check_device(cfg.device)
    check_cache_dir(cfg.cache_dir)
    for k in ("model", "class_map", "data_root"):
        v = getattr(cfg, k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise Mgd3Error(f"--{k.replace('_', '-')} must be a non-empty string")
    if cfg.class_map is not None and not Path(cfg.class_map).expanduser().is_file():
        raise Mgd3Error(f"--class-map {cfg.class_map} is not a file")
    if cfg.save_resolution is not None:
        _check_image_memory(cfg.batch_size, cfg.save_resolution, "--save-resolution")
    if cfg.resolution is not None:
        _check_image_memory(cfg.batch_size, cfg.resolution, "--resolution")


def _check_image_memory(batch: int, resolution: int, flag_name: str) -> None:
    # one batch of float32 RGB images, the resized copy and its uint8 PNG array
    need = batch * 3 * resolution * resolution * (4 + 4 + 1)
    check_memory(need, f"{flag_name} {resolution} at --batch-size {batch}",
                 f"use a smaller {flag_name} or --batch-size")


def check_distill_run(cfg, backend, classes, cfg_scale: float) -> None:
    """Checks once the model is loaded and the classes are known, before the output folder is
    touched: every class label is one of the model's, the CFG scale (possibly from the model's
    mgd3.json) is a finite number >= 0, and a batch of generated images fits in memory."""
    n = int(getattr(backend, "num_classes", 0) or 0)
    if n > 0:
        bad = [c for c in classes if not 0 <= int(c.label) < n]
        if bad:
            raise Mgd3Error(f"class {bad[0].class_id!r} maps to label {bad[0].label}, outside the model's "
                            f"0..{n - 1} (check --class-map)")
    if cfg.sampler.cfg is None:  # the model's recommendation (mgd3.json), checked as --cfg is
        Rule(minimum=0.0).check(f"cfg recommended by {backend.path}/mgd3.json", float(cfg_scale))
    _check_image_memory(cfg.batch_size, int(cfg.save_resolution or backend.resolution), "the image size")


# the sampler settings a model's mgd3.json may recommend: folder-wide, in a "by_ipc" entry, or among
# a method's options (then that method's own; Backend.defaults_at)
SAMPLER_RECOMMENDATIONS = ("cfg", "steps", "cfg_interval")


def check_recommended(defaults, source: str, by_ipc: bool = True) -> dict:
    """A model's recommended settings (mgd3.json "defaults"): a mapping, cfg a finite number >= 0
    and steps an integer >= 1 (both also per method), method options a mapping per method; `by_ipc`
    a list of such mappings, each with an inclusive "ipc": [low, high] range (ranges must not
    overlap)."""
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise Mgd3Error(f"{source}: \"defaults\" must be a mapping, got {_short(defaults)}")
    if "by_ipc" in defaults:
        if not by_ipc:
            raise Mgd3Error(f"{source}: a \"by_ipc\" entry cannot hold another \"by_ipc\"")
        defaults = {**defaults, "by_ipc": _check_by_ipc(defaults["by_ipc"], source)}
    for key in SAMPLER_RECOMMENDATIONS:
        if key in defaults:
            defaults = {**defaults, key: _sampler_recommendation(key, defaults[key], source, "")}
    methods = defaults.get("methods")
    if methods is not None:
        if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
            raise Mgd3Error(f"{source}: \"methods\": each method's recommendation must be a mapping of option: value")
        checked = {}
        for m, opts in methods.items():
            fields = method_option_fields()
            from mgd3.methods import option_flag

            by_flag = {option_flag(f).lstrip("-"): name for name, f in fields.items()}
            conv = {}
            for k, v in opts.items():
                if k in SAMPLER_RECOMMENDATIONS:  # the method's own CFG scale or steps (Backend.defaults_at)
                    conv[k] = _sampler_recommendation(k, v, source, f" of method {m}")
                    continue
                name = by_flag.get(str(k).replace("_", "-"), str(k))
                conv[k] = check_method_options({name: v}, source).get(name, v) if name in fields else v
            checked[m] = conv
        defaults = {**defaults, "methods": checked}
    return defaults


def _sampler_recommendation(key: str, value, source: str, where: str):
    """A recommended CFG scale (a finite number >= 0), step count (as --steps allows) or CFG
    interval ([LOW, HIGH] as --cfg-interval allows)."""
    if key == "cfg_interval":
        from mgd3.sampling import check_cfg_interval

        return check_cfg_interval(convert(key, value, "tuple[float, float]", source), f"{source}: {key}{where}")
    v = convert(key, value, "float" if key == "cfg" else "int", source)
    (Rule(minimum=0.0) if key == "cfg" else SAMPLER_RULES["steps"]).check(f"{source}: {key}{where}", v)
    return v


def _check_by_ipc(entries, source: str) -> list[dict]:
    """mgd3.json "by_ipc": [{"ipc": [low, high], "cfg": ..., "steps": ..., "methods": {...},
    "evidence": "..."}]."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Mgd3Error(f"{source}: \"by_ipc\" must be a list of mappings, got {_short(entries)}")
    checked, seen = [], []
    for e in entries:
        rng = e.get("ipc")
        if not (isinstance(rng, list) and len(rng) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in rng) and 1 <= rng[0] <= rng[1]):
            raise Mgd3Error(f"{source}: every \"by_ipc\" entry needs \"ipc\": [low, high], two integers "
                            f"1 <= low <= high, got {_short(rng)}")
        for lo, hi in seen:
            if rng[0] <= hi and lo <= rng[1]:
                raise Mgd3Error(f"{source}: \"by_ipc\" ranges {[lo, hi]} and {rng} overlap")
        seen.append(tuple(rng))
        if "evidence" in e and not isinstance(e["evidence"], str):
            raise Mgd3Error(f"{source}: \"evidence\" of a \"by_ipc\" entry must be a string")
        checked.append(check_recommended(e, f"{source} (by_ipc {rng})", by_ipc=False))
    return checked


# --------------------------------------------------------------------------- evaluate


def _protocol_names():
    from mgd3.evaluate.protocols import PROTOCOLS

    return PROTOCOLS.names()


def _network_names():
    from mgd3.evaluate.networks import NETWORKS

    return NETWORKS.names()


EVAL_RULES: dict[str, Rule] = {
    "seeds": Rule(minimum=0, maximum=RANDOM_STATE_MAX), "epochs": Rule(minimum=1, maximum=1_000_000),
    "batch_size": Rule(minimum=1, maximum=1_000_000), "resolution": Rule(minimum=1, maximum=4096),
    "reference": Rule(choices=("random-real", "full")), "ipc": Rule(minimum=1, maximum=100_000),
    "teacher_epochs": Rule(minimum=1, maximum=1_000_000), "workers": Rule(minimum=0, maximum=1024),
    "threads": Rule(minimum=1, maximum=4096),
}


def eval_config(values: dict, options: dict, source: str = "--config", progress: bool = True,
                use_cache: bool = True):
    from mgd3.evaluate.core import EvalConfig

    if isinstance(values.get("arch"), str):
        values = {**values, "arch": values["arch"].lower()}
    top = fill(EvalConfig, values, source, skip=("options", "progress", "use_cache"))
    cfg = EvalConfig(**top, options=check_protocol_options(options), progress=progress, use_cache=use_cache)
    validate_eval(cfg)
    return cfg


def validate_eval(cfg) -> None:
    from mgd3.evaluate.networks import NETWORKS
    from mgd3.evaluate.protocols import PROTOCOLS

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
    from mgd3.evaluate.protocols import Protocol

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
                raise Mgd3Error(f"--option {k} must be a mapping, got {_short(v)}")
            out[k] = v
            continue
        v = convert(k, v, fields[k].type, "--option")
        if k in PROTOCOL_RULES:
            PROTOCOL_RULES[k].check(f"--option {k}", v)
        out[k] = v
    if "dsa" in out:
        from mgd3.evaluate.protocols import DSAParams

        dfields = {f.name: f for f in dataclasses.fields(DSAParams)}
        bad = sorted(set(out["dsa"]) - set(dfields))
        if bad:
            raise Mgd3Error(f"unknown DSA option {bad[0]!r} (--option dsa); known: {', '.join(sorted(dfields))}")
        for k, v in out["dsa"].items():
            conv = convert(f"dsa.{k}", v, dfields[k].type, "--option")
            if isinstance(conv, float):
                Rule(minimum=0.0).check(f"--option dsa.{k}", conv)
    return out


# --------------------------------------------------------------------------- report


def _embedding_names():
    from mgd3.report import EMBEDDINGS

    return EMBEDDINGS.names()


REPORT_RULES: dict[str, Rule] = {
    "embedding": Rule(choices=_embedding_names, what="embedding"), "max_real_per_class": POSITIVE,
    "plot_real_per_class": Rule(minimum=0, maximum=1_000_000), "neighbors": Rule(minimum=1, maximum=1_000_000),
    "encode_batch_size": Rule(minimum=1, maximum=1_000_000), "threads": Rule(minimum=1, maximum=4096),
}


def report_config(values: dict, source: str = "--config"):
    from mgd3.report import ReportConfig

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


# --------------------------------------------------------------------------- pretrain


def _size_names():
    from mgd3.pretrain import SIZES

    return list(SIZES)


PRETRAIN_RULES: dict[str, Rule] = {
    "resolution": Rule(minimum=2, maximum=4096), "channels": Rule(choices=(1, 3)),
    "latent_channels": Rule(minimum=1, maximum=64), "vae_levels": Rule(minimum=1, maximum=8),
    "vae_width": Rule(minimum=1, maximum=1024), "vae_epochs": Rule(minimum=1, maximum=100_000),
    "vae_batch_size": Rule(minimum=1, maximum=1_000_000), "vae_lr": Rule(above=0.0, maximum=10.0),
    "vae_loss": Rule(choices=("mse", "l1")), "kl_weight": Rule(minimum=0.0),
    "size": Rule(choices=_size_names), "patch_size": Rule(minimum=1, maximum=64),
    "epochs": Rule(minimum=0, maximum=1_000_000), "train_steps": Rule(minimum=1, maximum=10**9),
    "vae_decoder_epochs": Rule(minimum=0, maximum=100_000),
    "batch_size": Rule(minimum=1, maximum=1_000_000), "lr": Rule(above=0.0, maximum=10.0),
    "ema_decay": Rule(minimum=0.0, below=1.0), "label_dropout": Rule(minimum=0.0, below=1.0),
    "cfg": FINITE_NON_NEGATIVE, "seed": Rule(minimum=0, maximum=RANDOM_STATE_MAX), "limit": POSITIVE,
    "max_steps": POSITIVE, "max_minutes": Rule(above=0.0), "quality_real_epochs": Rule(minimum=1),
    "quality_cas_epochs": Rule(minimum=1), "arch": Rule(choices=("dit", "unet")),
}


def pretrain_config(values: dict, source: str = "--config", command: str = ""):
    from mgd3.pretrain import PretrainConfig

    quiet = convert("quiet", values.pop("quiet", False), "bool", source)
    top = fill(PretrainConfig, values, source, skip=("progress", "command"))
    for req in ("data", "out"):
        if req not in top:
            raise Mgd3Error(f"--{req} is required")
    cfg = PretrainConfig(**top, progress=not quiet, command=command)
    validate_pretrain(cfg)
    return cfg


def validate_pretrain(cfg) -> None:
    check_types(cfg)
    check_rules(cfg, PRETRAIN_RULES)
    check_device(cfg.device)


# --------------------------------------------------------------------------- argparse


def given(args: argparse.Namespace, drop: Iterable[str] = ("func", "command", "verbose")) -> dict:
    """The options given on the command line (parsers use argument_default=SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k not in set(drop)}


def merged(args: argparse.Namespace) -> tuple[dict, str]:
    """(YAML values overridden by the flags given, source name for messages)."""
    flags = given(args)
    path = flags.pop("config", None)
    values = load_yaml(path) if path is not None else {}
    values.update(flags)
    return values, (f"--config {path}" if path is not None else "the command line")


def suppress_defaults(parser: argparse.ArgumentParser) -> None:
    """Leave unset options out of the parsed namespace (so a YAML value is not hidden by a flag's
    default) while `--help` still shows the default."""
    for action in parser._actions:
        if action.dest in ("help", "version") or action.required or action.default is argparse.SUPPRESS:
            continue
        if action.default is not None and action.help and "%(default)" not in action.help \
                and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            action.help += f" (default: {action.default})"
        action.default = argparse.SUPPRESS
    parser.formatter_class = argparse.HelpFormatter
