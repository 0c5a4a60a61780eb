"""mgd3: training-free dataset distillation with pretrained diffusion models.

The Python API, the CLI's sub-commands as plain functions (defined in `mgd3.api`):
`mgd3.distill(data, out, ...)`, `mgd3.evaluate(set, ...)`, `mgd3.load_set(path)`,
`mgd3.load_model(path)` and the `DistilledSet` they return. The packages below are the stages
of docs/ARCHITECTURE.md: `core` (sampler, guidance, modes, encoding), `io` (real data, the set on
disk), `backends`, `evaluation`, `methods`, `run` (the distill driver), `train`, `report`, `cli`.
Everything heavy loads on first use, so `import mgd3` is light.
"""

from mgd3.errors import Mgd3Error
from mgd3.version import __version__

__all__ = ["Mgd3Error", "__version__", "distill", "evaluate", "load_set", "load_model", "DistilledSet"]


def __getattr__(name: str):
    if name in ("distill", "evaluate", "load_set", "load_model", "DistilledSet"):
        import mgd3.api

        return getattr(mgd3.api, name)
    raise AttributeError(f"module 'mgd3' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
