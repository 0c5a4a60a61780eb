"""Configuration machinery for every sub-command, and nothing of any command: an optional YAML
file and CLI flags fill a command's typed dataclass the same way, and every value is checked
before any file is written or any data or model loads.

- Types come from the dataclass annotations (`int`, `float | None`, `list[str] | None`, ...):
  a YAML `ipc: "ten"`, `ipc: 1.7`, `ipc: true` or `steps: [1, 2]` is one line naming the key and
  the type it needs. Unknown keys are refused with the known ones.
- Ranges, finiteness and choices are `Rule`s; each command keeps its table of rules beside its
  own configuration (`mgd3.run.settings`, `mgd3.evaluation.settings`, `mgd3.report`,
  `mgd3.train.pretrain_settings`).
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

from mgd3 import safeio
from mgd3.errors import Mgd3Error, first_line

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
        data = safeio.read_yaml(p, 1 << 20, f"config file {path}", "options file")  # bounded (issue 32)
    except UnicodeDecodeError:
        raise Mgd3Error(f"config file {path} is not a text (UTF-8) file") from None
    except OSError as e:
        raise Mgd3Error(f"cannot read config file {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        first = first_line(e)
        raise Mgd3Error(f"config file {path} is not valid YAML ({first})") from None
    except RecursionError:
        raise Mgd3Error(f"config file {path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Mgd3Error(f"config file {path} must hold a mapping of option: value, not a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# --------------------------------------------------------------------------- types


def short(value) -> str:
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
    raise Mgd3Error(f"{where}{key} must be {expected(annotation)}, got {short(value)}")


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
                raise Mgd3Error(f"unknown {self.what or name} {short(v)}; known: {', '.join(map(str, known))}")
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
SEED = Rule(minimum=0, maximum=SEED_MAX)
RESOLUTION = Rule(minimum=1, maximum=MAX_RESOLUTION)
FINITE_NON_NEGATIVE = Rule(minimum=0.0)
STEPS = Rule(minimum=1, maximum=100_000)  # sampling steps, wherever they are set


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_rules(obj, rules: dict[str, Rule]) -> None:
    """Every rule whose field `obj` has, named by its flag."""
    for name, rule in rules.items():
        if hasattr(obj, name):
            rule.check(flag(name), getattr(obj, name))


def default_device() -> str:
    """What `--device auto` means: the first CUDA device when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> str:
    """A --device value with "auto" (or None) resolved (`default_device`); others as given."""
    return default_device() if name is None or str(name).lower() == "auto" else str(name)


def check_device(name: str | None, flag_name: str = "--device") -> None:
    """cpu, cuda, cuda:N, mps or auto, and there."""
    import torch

    if name is None or str(name).lower() == "auto":
        return
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise Mgd3Error(f"unknown {flag_name} {short(name)}; use cpu, cuda, cuda:N or auto") from None
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


def check_image_memory(batch: int, resolution: int, flag_name: str) -> None:
    # one batch of float32 RGB images, the resized copy and its uint8 PNG array
    need = batch * 3 * resolution * resolution * (4 + 4 + 1)
    check_memory(need, f"{flag_name} {resolution} at --batch-size {batch}",
                 f"use a smaller {flag_name} or --batch-size")



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
