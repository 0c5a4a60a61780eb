"""Stage: model backends. A backend adapts a pretrained latent diffusion model to mgd3's
interface: a `Denoiser` (x_t, t, cond) -> ε (+ learned variance), VAE encode/decode,
conditioning for class labels, and the training noise schedule.

Backends are found by the pipeline class in the folder's `model_index.json` (`base` holds the
interface and the registry; `dit`, `sd` and `unet` register themselves when imported).
"""

from __future__ import annotations

import os

import torch

from mgd3.backends.base import (BACKENDS, PIPELINE_CLASSES, Backend, check_model_size, default_device,  # noqa: F401
                                read_id2label, read_json_object, read_model_index, read_recommendations,
                                resolve_model_path)
from mgd3.errors import Mgd3Error


def load_backend(model: str | os.PathLike, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> Backend:
    """Load the backend that fits the pipeline folder `model` (local path or cached repo id)."""
    import mgd3.backends.dit  # noqa: F401  (registers)
    import mgd3.backends.sd  # noqa: F401  (registers)
    import mgd3.backends.unet  # noqa: F401  (registers)

    from mgd3.config import check_device

    check_device(str(device))
    if precision not in ("fp32", "bf16", "fp16"):
        raise Mgd3Error(f"unknown precision {precision!r}; known: bf16, fp16, fp32")
    path = resolve_model_path(model)
    index = read_model_index(path)
    cls = index.get("_class_name")
    name = PIPELINE_CLASSES.get(cls) if isinstance(cls, str) else None
    if name is None:
        known = ", ".join(sorted(PIPELINE_CLASSES))
        raise Mgd3Error(f"{path}: pipeline class {cls!r} is not supported; supported: {known}")
    return BACKENDS.get(name)(path, index, torch.device(device), precision)


