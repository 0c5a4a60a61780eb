"""mgd3: training-free dataset distillation with pretrained diffusion models.

Stages, in data-flow order (one module each):
real data (`data`) -> VAE encoding (`encode`) -> modes (`modes`) -> guided sampler
(`sampling`, `guidance`) -> methods (`methods`) -> distilled set on disk (`store`).
"""

__version__ = "0.1.0"

from mgd3.errors import Mgd3Error

__all__ = ["Mgd3Error", "__version__"]
