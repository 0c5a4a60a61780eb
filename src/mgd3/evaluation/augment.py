"""Stage: evaluation — batched training-time augmentations on in-memory tensors.

* DSA, differentiable siamese augmentation (Zhao & Bilen, ICML 2021; the DC/DSA code's
  `DiffAugment` in single mode "S"): one op of the strategy is drawn per batch; its
  parameters are drawn per image (`same_params=False`, what the DSA code does when it trains
  evaluation networks: `DiffAugment(seed=-1)` -> `batchmode=False`) or once for the whole
  batch (`same_params=True`, the siamese mode the DSA code uses while matching). Ops act on
  normalised images, like the original.
* Minimax / IDC ImageNet transforms (Kim et al. 2022; Gu et al. 2024): RandomResizedCrop
  (scale (0.5, 1)), horizontal flip, ColorJitter(0.4, 0.4, 0.4), PCA lighting (alpha std 0.1);
  on images in [0, 1], before normalisation. Batched per-image versions of the torchvision
  ops; ColorJitter applies its three factors in one random order per batch (torchvision draws
  an order per image).
* CutMix (Yun et al., 2019) as IDC / RDED apply it: one box and one permutation per batch.

Every random draw comes from an explicit `torch.Generator` (CPU), so a seed fixes the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _rand(gen: torch.Generator, n: int, same: bool, device) -> Tensor:
    """(n,) uniform [0, 1); one value repeated when `same`."""
    r = torch.rand(1 if same else n, generator=gen)
    return r.expand(n).contiguous().to(device) if same else r.to(device)


def _randint(gen: torch.Generator, low: int, high: int, n: int, same: bool, device) -> Tensor:
    r = torch.randint(low, high, (1 if same else n,), generator=gen)
    return r.expand(n).contiguous().to(device) if same else r.to(device)


# --------------------------------------------------------------------------- DSA


@dataclass(frozen=True)
class DSAParams:
    """The DSA code's `ParamDiffAug` strengths (docs/METHODS.md §5.2)."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    scale: float = 1.2
    rotate: float = 15.0  # degrees
    crop: float = 0.125  # padding-shift ratio
    cutout: float = 0.5  # side of the cut square, ratio of the image side
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    flip: float = 0.5  # probability
    same_params: bool = False  # True: one parameter set for the whole batch (siamese mode)


def dsa_brightness(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    r = _rand(gen, x.shape[0], same, x.device).view(-1, 1, 1, 1).to(x.dtype)
    return x + (r - 0.5) * p.brightness


def dsa_saturation(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    r = _rand(gen, x.shape[0], same, x.device).view(-1, 1, 1, 1).to(x.dtype)
    return (x - mean) * (r * p.saturation) + mean


def dsa_contrast(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    r = _rand(gen, x.shape[0], same, x.device).view(-1, 1, 1, 1).to(x.dtype)
    return (x - mean) * (r + p.contrast) + mean


def dsa_crop(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    """Shift by up to ratio x side pixels; uncovered pixels are zero (the DSA 1-px zero pad)."""
    b, _, h, w = x.shape
    sx, sy = int(h * p.crop + 0.5), int(w * p.crop + 0.5)
    tx = _randint(gen, -sx, sx + 1, b, same, x.device).view(-1, 1, 1)
    ty = _randint(gen, -sy, sy + 1, b, same, x.device).view(-1, 1, 1)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gx = (gx + tx + 1).clamp(0, h + 1)
    gy = (gy + ty + 1).clamp(0, w + 1)
    x_pad = F.pad(x, [1, 1, 1, 1])  # (B, C, H+2, W+2)
    return x_pad.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2).contiguous()


def dsa_cutout(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
    ox = _randint(gen, 0, h + (1 - ch % 2), b, same, x.device).view(-1, 1, 1)
    oy = _randint(gen, 0, w + (1 - cw % 2), b, same, x.device).view(-1, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, -1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, -1)
    x0, y0 = ox - ch // 2, oy - cw // 2
    inside = (rows >= x0) & (rows < x0 + ch) & (cols >= y0) & (cols < y0 + cw)  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def dsa_flip(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    r = _rand(gen, x.shape[0], same, x.device).view(-1, 1, 1, 1)
    return torch.where(r < p.flip, x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def dsa_scale(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    b, r = x.shape[0], p.scale
    sx = _rand(gen, b, same, "cpu") * (r - 1.0 / r) + 1.0 / r
    sy = _rand(gen, b, same, "cpu") * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _affine(x, theta)


def dsa_rotate(x: Tensor, p: DSAParams, gen: torch.Generator, same: bool) -> Tensor:
    b = x.shape[0]
    a = (_rand(gen, b, same, "cpu") - 0.5) * 2 * p.rotate / 180 * math.pi
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(-a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, theta)


DSA_OPS = {
    "color": (dsa_brightness, dsa_saturation, dsa_contrast),
    "crop": (dsa_crop,),
    "cutout": (dsa_cutout,),
    "flip": (dsa_flip,),
    "scale": (dsa_scale,),
    "rotate": (dsa_rotate,),
}


def dsa(x: Tensor, params: DSAParams, gen: torch.Generator) -> Tensor:
    """DSA single mode: one op of the strategy per batch, drawn from `gen`. x: (B, C, H, W)."""
    ops = [o for o in params.strategy.split("_") if o]
    if not ops:
        return x
    op = ops[int(torch.randint(0, len(ops), (1,), generator=gen))]
    for f in DSA_OPS[op]:
        x = f(x, params, gen, params.same_params)
    return x.contiguous()


# --------------------------------------------------------------------------- minimax / IDC transforms

# ImageNet PCA lighting (AlexNet; the IDC / FKD `Lighting` transform)
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]])


def random_resized_crop(x: Tensor, gen: torch.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                        size: int | None = None) -> Tensor:
    """Per-image torchvision RandomResizedCrop (10 attempts, whole image as fallback), bilinear.
    x: (B, C, H, W) -> (B, C, size, size)."""
    b, _, h, w = x.shape
    size = size or h
    area = h * w
    tries = 10
    target = area * (scale[0] + torch.rand(b, tries, generator=gen) * (scale[1] - scale[0]))
    logr = math.log(ratio[0]) + torch.rand(b, tries, generator=gen) * (math.log(ratio[1]) - math.log(ratio[0]))
    aspect = torch.exp(logr)
    cw = torch.sqrt(target * aspect).round()
    chh = torch.sqrt(target / aspect).round()
    ok = (cw > 0) & (cw <= w) & (chh > 0) & (chh <= h)  # (B, tries)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    rows = torch.arange(b)
    cw = torch.where(first >= 0, cw[rows, first.clamp(min=0)], torch.full((b,), float(w)))
    chh = torch.where(first >= 0, chh[rows, first.clamp(min=0)], torch.full((b,), float(h)))
    i = torch.floor(torch.rand(b, generator=gen) * (h - chh + 1))
    j = torch.floor(torch.rand(b, generator=gen) * (w - cw + 1))
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * j + cw) / w - 1
    theta[:, 1, 1] = chh / h
    theta[:, 1, 2] = (2 * i + chh) / h - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    r = torch.rand(x.shape[0], generator=gen).to(x.device).view(-1, 1, 1, 1)
    return torch.where(r < p, x.flip(3), x)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, H, W)


def color_jitter(x: Tensor, gen: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4) -> Tensor:
    """torchvision ColorJitter semantics on [0, 1] images, per-image factors in [1-s, 1+s]."""
    b = x.shape[0]

    def factor(s: float) -> Tensor:
        return (1 - s + torch.rand(b, generator=gen) * 2 * s).to(x.device, x.dtype).view(-1, 1, 1, 1)

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    for k in torch.randperm(3, generator=gen).tolist():
        if k == 0:
            x = (x * fb).clamp(0, 1)
        elif k == 1:
            m = _gray(x).mean((1, 2, 3), keepdim=True)
            x = (fc * x + (1 - fc) * m).clamp(0, 1)
        elif x.shape[1] == 3:  # saturation: a no-op on one channel
            x = (fs * x + (1 - fs) * _gray(x)).clamp(0, 1)
    return x


def lighting(x: Tensor, gen: torch.Generator, alpha_std: float = 0.1) -> Tensor:
    """AlexNet PCA lighting noise (per image); RGB only, a no-op on one channel."""
    if x.shape[1] != 3 or alpha_std == 0:
        return x
    alpha = torch.randn(x.shape[0], 3, generator=gen) * alpha_std  # (B, 3)
    rgb = (IMAGENET_EIGVEC.unsqueeze(0) * (alpha * IMAGENET_EIGVAL).unsqueeze(1)).sum(2)  # (B, 3)
    return x + rgb.to(x.device, x.dtype).view(-1, 3, 1, 1)


def minimax_transform(x01: Tensor, gen: torch.Generator, rrc_scale=(0.5, 1.0), jitter: float = 0.4,
                      lighting_std: float = 0.1) -> Tensor:
    """IDC / MinimaxDiffusion train transform on [0, 1] images (B, C, R, R)."""
    x = random_resized_crop(x01, gen, scale=rrc_scale)
    x = random_hflip(x, gen)
    if jitter:
        x = color_jitter(x, gen, jitter, jitter, jitter)
    return lighting(x, gen, lighting_std)


# --------------------------------------------------------------------------- CutMix


def cutmix(x: Tensor, beta: float, gen: torch.Generator, rng: np.random.Generator) -> tuple[Tensor, Tensor, float]:
    """IDC's CutMix: lam ~ Beta(beta, beta), a box of side sqrt(1 - lam) of the image centred at
    a uniform point (clipped), pasted from a random permutation of the batch.
    Returns (mixed images, permutation, ratio) where ratio = share of the original image kept."""
    b, _, h, w = x.shape
    lam = float(rng.beta(beta, beta))
    perm = torch.randperm(b, generator=gen).to(x.device)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x1, x2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    ratio = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return x, perm, float(ratio)
