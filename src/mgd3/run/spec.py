"""A `distill` run resolved once: `resolve_run` turns the settings, the model and the real data
into a frozen `RunSpec` — the sampler's steps, CFG scale and interval, the method's final options
(its stop index included), the classes with their model labels, what came from the model's
mgd3.json, and the data's and model's fingerprints. The method's `Context`, the run key and the
manifest read it; nothing changes it afterwards.

Precedence, for every setting: what the user gave, else the model's mgd3.json for this IPC and
method (`Backend.defaults_at`, read once), else mgd3's default (50 steps, CFG 4.0).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from mgd3.backends.base import Recommendation
from mgd3.backends.recommended import SAMPLER_RECOMMENDATIONS
from mgd3.files import folder_fingerprint
from mgd3.methods import (ClassInfo, Method, SamplerConfig, method_options, option_flag, options_by_field,
                          recommended_options, resolve_sampler)
from mgd3.run.settings import DistillConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommended:
    """What a run took from its model's mgd3.json (the manifest's `recommended`)."""

    source: str  # the mgd3.json file
    ipc_range: list[int] | None  # the "by_ipc" entry that applied; None: the folder-wide settings
    taken: dict  # {flag: value}, e.g. {"--lambda": 0.3, "--cfg": 2.5}

    def record(self) -> dict:
        return {"source": self.source, "ipc_range": self.ipc_range, "taken": self.taken}


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's images, resolved once (see the module docstring)."""

    config: DistillConfig  # the settings, with `sampler` resolved
    options: object  # the method's final options dataclass, None for a method without options
    classes: tuple[ClassInfo, ...]  # every class of the run, in data order, with its model label
    recommended: Recommended | None  # None: the model's mgd3.json set nothing of this run (or no model)
    recommendation: Recommendation | None  # the model's mgd3.json at this IPC and method (None: no model)
    data_fingerprint: str
    model_fingerprint: str | None  # None: a method that runs without a model

    @property
    def sampler(self) -> SamplerConfig:
        return self.config.sampler

    def resolved_config(self) -> dict:
        """The settings as a dict, every option filled in (the manifest's `config`; the run key's
        fields)."""
        d = dataclasses.asdict(self.config)
        d["options"] = dataclasses.asdict(self.options) if self.options is not None else {}
        return d


def resolve_run(cfg: DistillConfig, backend, data, labels: list[int], method_cls: type[Method]) -> RunSpec:
    """The run's `RunSpec` from its settings, its model (None: a method that needs none), its
    real data and the classes' model labels (in data order)."""
    classes = tuple(ClassInfo(i, cid, data.class_names[i], labels[i]) for i, cid in enumerate(data.class_ids))
    given = options_by_field(method_cls, cfg.options)
    if backend is None:
        sampler = resolve_sampler(cfg.sampler, None)
        options, recommended, model_fp, rec = method_options(method_cls, cfg.options), None, None, None
    else:
        rec = backend.defaults_at(cfg.ipc, method_cls.name)
        from_model = recommended_options(backend, method_cls, rec)
        sampler = resolve_sampler(cfg.sampler, rec, sample=method_cls.generative)
        options = method_options(method_cls, {**from_model, **given})
        recommended = _taken(cfg, backend, method_cls, rec, {k: v for k, v in from_model.items() if k not in given})
        model_fp = folder_fingerprint(backend.path)
    if options is not None:
        options = method_cls.resolve_options(options, sampler)
    return RunSpec(dataclasses.replace(cfg, sampler=sampler), options, classes, recommended, rec, data.fingerprint(),
                   model_fp)


def _taken(cfg: DistillConfig, backend, method_cls: type[Method], rec, used: dict) -> Recommended | None:
    """What the run takes from the model's mgd3.json: the method options the user did not give
    (`used`), and the sampler settings the user left unset (for a method that samples). Logged."""
    flags = {f.name: option_flag(f) for f in dataclasses.fields(method_cls.Options)} if method_cls.Options else {}
    taken = {flags[k]: v for k, v in used.items()}
    for key in SAMPLER_RECOMMENDATIONS:  # no sampler, no CFG and no steps
        if getattr(cfg.sampler, key) is None and key in rec.settings and method_cls.generative:
            taken[f"--{key.replace('_', '-')}"] = rec.settings[key]
    if not taken:
        return None
    where = f" for IPC {rec.ipc_range[0]}..{rec.ipc_range[1]}" if rec.ipc_range else ""
    log.info("%s settings recommended by %s/mgd3.json%s: %s", cfg.method, backend.path, where,
             ", ".join(f"{k} {v}" for k, v in taken.items()))
    return Recommended(f"{backend.path}/mgd3.json", rec.ipc_range, taken)
