"""Tiny DiT folders for exact comparisons: sampling stays bounded without training.

A randomly initialised DiT predicts an ε unrelated to x_t. On the standard linear schedule
(β 1e-4 … 0.02, ᾱ_999 = 4e-5) x̂0 = (x_t − sqrt(1 − ᾱ)·ε)/sqrt(ᾱ) is then amplified up to
1/sqrt(ᾱ_999) ≈ 156 per step and the final latents reach 1e2–1e6, so any float32 rounding
difference becomes 1e-4 or more. With β_end = 0.001 (ᾱ_999 ≈ 0.58) the same random network keeps
latents within about ±20, where float32 resolves 2e-6: a tolerance of 1e-5 then tests the
formulas, not the rounding. The schedule is read from the folder by every implementation compared, and
nothing in the formulas depends on its values. Built under fixed seeds: the same folder in every
process and in any test order. Also the two ways the references read a folder or a pipeline:
the transformer alone, and the latents a diffusers pipeline decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mgd3.testing import build_dit_folder

BETA_END = 0.001


def build_reference_dit(path: str | Path, *, num_classes: int = 10, learned_sigma: bool = True,
                        resolution: int = 16, image_channels: int = 3, class_names: list[str] | None = None,
                        seed: int = 0) -> Path:
    """A tiny DiT pipeline folder (4×(resolution/2)² latents, 2 layers, hidden 16) with linear
    betas 1e-4 … BETA_END. The global torch RNG is left as it was (the build seeds its own)."""
    with torch.random.fork_rng():
        path = build_dit_folder(path, num_classes=num_classes, resolution=resolution, learned_sigma=learned_sigma,
                                image_channels=image_channels, class_names=class_names, layers=2, heads=2,
                                head_dim=8, patch_size=2, seed=seed)
    return _with_reference_beta_end(path)


def build_reference_sd(path: str | Path, *, seed: int = 0) -> Path:
    """The tiny Stable Diffusion folder of `mgd3.testing` with scaled-linear betas 0.00085 … BETA_END
    (the same reason as above: SD's 0.012 lets a random UNet's latents reach ~70 at CFG 8)."""
    from mgd3.testing import build_sd_folder

    with torch.random.fork_rng():
        path = build_sd_folder(path, seed=seed)
    return _with_reference_beta_end(path)


def _with_reference_beta_end(path: Path) -> Path:
    """Rewrite the folder's scheduler config to end its betas at BETA_END."""
    sched = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["beta_end"] = BETA_END
    sched.write_text(json.dumps(cfg, indent=2))
    return path


def load_raw_transformer(folder: Path):
    """The folder's DiT transformer loaded by diffusers alone (eval mode, no gradients): what the
    references run, sharing no code with mgd3's backend."""
    from diffusers import DiTTransformer2DModel

    tr = DiTTransformer2DModel.from_pretrained(folder / "transformer", low_cpu_mem_usage=False)
    return tr.eval().requires_grad_(False)


def record_decoded_latents(pipe) -> dict:
    """Make a diffusers pipeline keep the final latents it decodes: after a call the returned dict
    holds them under "latents", in the model's scale (times the VAE's scaling factor)."""
    seen = {}
    decode = pipe.vae.decode

    def record(z, *a, **kw):
        seen["latents"] = z * pipe.vae.config.scaling_factor
        return decode(z, *a, **kw)

    pipe.vae.decode = record
    return seen
