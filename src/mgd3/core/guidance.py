"""Stage: step-level guidance for the sampler (callables Step -> corrected mean).

Mode guidance and stop guidance of MGD³ (Chan-Santiago et al., ICML 2025, arXiv 2505.18963).
g = m - x̂0 points from the prediction to the image's mode. Three forms of the update:

- "ddpm" (official code): x_{t-1} = μ + λ·σ_t·g + σ_t·z. Needs a sampler that adds noise.
- "ddim" (paper Eq. 6 / Algorithm 1): ε̂ = ε̃ - sqrt(1 - ᾱ_t)·λ·g, then the sampler's update.
- "x0": x̂0' = x̂0 + λ·g (λ = 1 puts x̂0 on the mode), the update re-derived from x̂0'.
  Bounded: it never magnifies the ε error at high noise as the ε forms can.
"auto" takes the update rule's own form (`UpdateRule.guidance_form`: "ddpm" for the DDPM
sampler, "ddim" for DDIM), never the sampler's name.
"""

from __future__ import annotations

import math

from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.core.sampling import Guidance, Step

GUIDANCE_FORMS = ("auto", "ddpm", "ddim", "x0")


class ModeGuidance:
    """Pull each item's x̂0 toward its mode. modes: (B, C, h, w), one per item of the batch."""

    def __init__(self, modes: Tensor, scale: float, form: str = "auto"):
        if form not in GUIDANCE_FORMS:
            raise Mgd3Error(f"unknown guidance form {form!r}; known: {', '.join(GUIDANCE_FORMS)}")
        self.targets, self.scale, self.form = modes, float(scale), form

    def __call__(self, step: Step) -> Tensor:
        form = self.form
        if form == "auto":
            form = step.guidance_form
        g = self.targets - step.x0  # (B, C, h, w)
        if form == "ddpm":
            return step.mean + self.scale * step.sigma * g
        if form == "ddim":
            return step.mean_from_eps(step.eps - math.sqrt(1.0 - step.alpha_bar) * self.scale * g)
        return step.mean_from_eps(step.eps_from_x0(step.x0 + self.scale * g))


class StopWindow:
    """Stop guidance: apply `guidance` only while t_stop < index (<= t_start, if given).

    With 50 steps (index 49 ... 0) t_stop = 25 guides the first 24 steps; t_stop = -1 guides
    every step, t_stop = steps - 1 none.
    """

    def __init__(self, guidance: Guidance, t_stop: int, t_start: int | None = None):
        self.guidance, self.t_stop, self.t_start = guidance, t_stop, t_start

    def active(self, index: int) -> bool:
        return index > self.t_stop and (self.t_start is None or index <= self.t_start)

    def __call__(self, step: Step) -> Tensor:
        return self.guidance(step) if self.active(step.index) else step.mean
