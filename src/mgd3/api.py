"""The Python API: `distill`, `evaluate`, `load_set` and `load_model`, the CLI's sub-commands as
functions. Settings go by the CLI's names (`ipc`, `steps`, `cfg`, ...; method options as
documented: `lambda`, `t_stop`), a model by its path or as a backend loaded once
(`load_model`) for many runs, and a distillation returns the set it wrote.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping


from mgd3.config import resolve_device
from mgd3.errors import Mgd3Error
from mgd3.io.set_reader import DistilledSet, load_set

__all__ = ["distill", "evaluate", "load_set", "load_model", "DistilledSet"]


def load_model(model: str | os.PathLike, device: str = "auto", precision: str = "fp32"):
    """A model loaded once, to pass as `model=` to many `distill` calls: a local pipeline folder,
    a Hugging Face repo id, or the name of a data set mgd3 ships a model for ("fashion-mnist")."""
    from mgd3.backends import load_backend
    from mgd3.run.settings import shipped_model

    shipped = shipped_model(str(model)) if not Path(model).expanduser().exists() else None
    return load_backend(shipped or model, device=resolve_device(device),
                        precision=precision)


def _split_settings(method: str, settings: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Keyword settings -> (DistillConfig fields, SamplerConfig fields, method options by name)."""
    from mgd3.run.settings import DistillConfig
    from mgd3.methods import SamplerConfig, describe_options, get_method, option_names

    top_names = {f.name for f in dataclasses.fields(DistillConfig)} - {"sampler", "options", "data", "out",
                                                                        "model", "method"}
    sampler_names = {f.name for f in dataclasses.fields(SamplerConfig)}
    method_cls = get_method(method)
    option_keys = option_names(method_cls)
    top, sampler, options = {}, {}, {}
    for k, v in settings.items():
        key = k.replace("-", "_")
        if key in top_names:
            top[key] = v
        elif key in sampler_names:
            sampler[key] = v
        elif k in option_keys or key in option_keys:
            options[k] = v
        else:
            accepted = ", ".join(sorted(top_names | sampler_names))
            raise Mgd3Error(f"distill() takes no setting {k!r}; settings: {accepted}; "
                            f"options of method {method!r}: {describe_options(method_cls)}")
    return top, sampler, options


def distill(data: str, out: str | os.PathLike, *, model=None, method: str = "mgd3",
            options: Mapping[str, Any] | None = None, **settings) -> DistilledSet:
    """Distill `data` into the folder `out` and return the set.

    model: a pipeline folder or Hugging Face repo id, a backend from `load_model` (loaded once for
    many runs), or None for the model mgd3 ships for `data`. options: the method's options by their
    documented names (`{"lambda": 0.3, "t_stop": 25}`; `t-stop` and field names such as `lam` work
    too). settings: any other `mgd3 distill` flag without "--", "_" for "-" (`ipc=10`, `seed=1`,
    `steps=50`, `cfg=4.0`, `classes=[...]`, `overwrite=True`, `progress=False`); method options
    whose names are Python names may be given here as well (`t_stop=25`)."""
    from mgd3.backends import Backend
    from mgd3.run.settings import DistillConfig
    from mgd3.run.driver import distill as run_distill
    from mgd3.methods import SamplerConfig

    top, sampler, more = _split_settings(method, settings)
    given = {**(options or {}), **more}
    backend = model if isinstance(model, Backend) else None
    path = None if model is None or backend is not None else str(model)
    cfg = DistillConfig(data=data, out=str(out), model=path, method=method, sampler=SamplerConfig(**sampler),
                        options=given, **top)
    result = run_distill(cfg, backend=backend)
    s = load_set(result.out)
    s.summary = result
    return s


def evaluate(distilled: DistilledSet | str | os.PathLike | None = None, **settings) -> dict:
    """Train fresh networks on a distilled set (a `DistilledSet` or its folder) and test them on
    the real test split; returns what eval.json holds (`result["mean"]`, `result["std"]`: the
    final test accuracy in %, over the seeds; `result["runs"]`: one entry per seed). settings:
    any `mgd3 evaluate` flag without "--" (`protocol`, `arch`, `seeds`, `epochs`, `device`, ...);
    `reference="random-real", ipc=10, data=...` scores a reference instead of a set."""
    from mgd3.evaluation import EvalConfig
    from mgd3.evaluation import evaluate as run_evaluate

    names = {f.name for f in dataclasses.fields(EvalConfig)} - {"set_dir"}
    values = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise Mgd3Error(f"evaluate() takes no setting {', '.join(map(repr, unknown))}; settings: "
                        f"{', '.join(sorted(names))}")
    set_dir = str(distilled.path if isinstance(distilled, DistilledSet) else distilled) if distilled else None
    from mgd3.run.ranks import launched

    return launched(run_evaluate, EvalConfig(set_dir=set_dir, **values))  # under torchrun: rank 0's result
