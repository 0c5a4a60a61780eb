"""The Python API: `distill`, `evaluate`, `load_set` and `load_model`, the CLI's sub-commands as
functions. Settings go by the CLI's names (`ipc`, `steps`, `cfg`, ...; method options as
documented: `lambda`, `t_stop`), a model by its path or as a backend loaded once
(`load_model`) for many runs, and a distillation returns the set it wrote.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from mgd3.errors import Mgd3Error


class _CallableModule(types.ModuleType):
    """A module that is also the API function of its name: `mgd3.distill(...)` calls
    `mgd3.api.distill`, while `mgd3.distill.DistillConfig` (and every import of the module)
    stays as it was."""

    def __call__(self, *args, **kwargs):
        return globals()[self.__name__.rsplit(".", 1)[1]](*args, **kwargs)


def callable_module(name: str) -> None:
    """Make the module `name` (mgd3.distill, mgd3.evaluate) callable as its API function."""
    sys.modules[name].__class__ = _CallableModule


@dataclass
class DistilledSet:
    """A distilled set read from its folder (see README, "What a run writes")."""

    path: Path
    images: Tensor  # (N, C, R, R) uint8, as written (`images.float() / 255` for [0, 1])
    labels: Tensor  # (N,) int64 class index, into `class_names` (= torchvision ImageFolder's index)
    class_ids: list[str]
    class_names: list[str]
    manifest: dict
    latents: Tensor | None = None  # (N, c, h, w) float32 from latents.pt, when the method has latents
    summary: Mapping | None = None  # the run's `DistillResult`, for a set `distill` just wrote

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def model_labels(self) -> Tensor:
        """(N,) the model's class label of every image (e.g. the ImageNet index for DiT-XL/2)."""
        return torch.as_tensor([r["label"] for r in self.manifest["images"]], dtype=torch.int64)


def load_set(path: str | os.PathLike) -> DistilledSet:
    """Read the distilled set mgd3 wrote to `path`: its images as one uint8 tensor, class
    indices, class ids and names, the manifest and (when written) the latents."""
    from mgd3 import store
    from mgd3.images import open_image

    s = store.read_set(path, allow_image_folder=False)  # containment and consistency checked there
    arrays = []
    for f in s.files:
        try:
            with open_image(f) as im:  # a regular file within the pixel budget (mgd3.images)
                a = np.asarray(im)
        except OSError as e:
            raise Mgd3Error(f"cannot read image {f} of set {s.path} ({e})") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))  # (C, R, R)
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, dtype=torch.uint8)
    latents = store.read_latents(s.path)["latents"] if (s.path / "latents.pt").is_file() else None
    return DistilledSet(s.path, images, torch.as_tensor(s.targets, dtype=torch.int64), s.class_ids, s.class_names,
                        s.manifest, latents)


def load_model(model: str | os.PathLike, device: str = "auto", precision: str = "fp32"):
    """A model loaded once, to pass as `model=` to many `distill` calls: a local pipeline folder,
    a Hugging Face repo id, or the name of a data set mgd3 ships a model for ("fashion-mnist")."""
    from mgd3.backends import default_device, load_backend
    from mgd3.distill import shipped_model

    shipped = shipped_model(str(model)) if not Path(model).expanduser().exists() else None
    return load_backend(shipped or model, device=default_device() if device == "auto" else device,
                        precision=precision)


def _split_settings(method: str, settings: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Keyword settings -> (DistillConfig fields, SamplerConfig fields, method options by name)."""
    from mgd3.distill import DistillConfig
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
    from mgd3.distill import DistillConfig
    from mgd3.distill import distill as run_distill
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
    from mgd3.evaluate import EvalConfig
    from mgd3.evaluate import evaluate as run_evaluate

    names = {f.name for f in dataclasses.fields(EvalConfig)} - {"set_dir"}
    values = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise Mgd3Error(f"evaluate() takes no setting {', '.join(map(repr, unknown))}; settings: "
                        f"{', '.join(sorted(names))}")
    set_dir = str(distilled.path if isinstance(distilled, DistilledSet) else distilled) if distilled else None
    return run_evaluate(EvalConfig(set_dir=set_dir, **values))
