"""mgd3: training-free dataset distillation with pretrained diffusion models.

Stages, in data-flow order (one module each):
real data (`data`) -> VAE encoding (`encode`) -> modes (`modes`) -> guided sampler
(`sampling`, `guidance`) -> methods (`methods`) -> distilled set on disk (`store`).

The Python API (`mgd3.api`): `mgd3.distill(...)`, `mgd3.evaluate(...)`, `mgd3.load_set(path)`,
`mgd3.load_model(path)`. `mgd3.distill` and `mgd3.evaluate` are also the modules of those
stages; called, they run the API function. Everything loads on first use, so `import mgd3` is light.
"""

import importlib

__version__ = "0.1.0"

from mgd3.errors import Mgd3Error  # noqa: E402

__all__ = ["Mgd3Error", "__version__", "distill", "evaluate", "load_set", "load_model", "DistilledSet"]


def __getattr__(name: str):
    if name in ("distill", "evaluate"):  # the module, callable (see mgd3.api.callable_module)
        return importlib.import_module(f"mgd3.{name}")
    if name in ("load_set", "load_model", "DistilledSet"):
        return getattr(importlib.import_module("mgd3.api"), name)
    raise AttributeError(f"module 'mgd3' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
