"""The training images of `mgd3 pretrain`, held in memory as uint8, and their conversion to
the models' float range."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mgd3.errors import Mgd3Error
from mgd3.files import to_uint8
from mgd3.train.pretrain_settings import PretrainConfig


def to_float(x: Tensor, device) -> Tensor:
    """uint8 images -> float on `device` in the models' range [-1, 1]."""
    return x.to(device).float() / 127.5 - 1.0  # (B, C, R, R) in [-1, 1]


def load_split(cfg: PretrainConfig, split: str, limit: int | None = None):
    """(RealData, images uint8 (N, C, R, R), class indices (N,)), or None for a missing test split.

    Images are kept in memory as uint8 (the sources are 8-bit: lossless, 4x smaller than float).
    """
    from mgd3.io.data import load_data

    try:
        data = load_data(cfg.data, split, resolution=cfg.resolution, channels=cfg.channels, classes=cfg.classes,
                         data_root=cfg.data_root)
    except Mgd3Error:
        if split == "train":
            raise
        return None
    if len(data) == 0:
        if split == "train":
            raise Mgd3Error(f"{cfg.data}: the train split holds no images")
        return None
    idx = np.arange(len(data))
    if limit and limit < len(data):
        idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(data))[:limit])
    need = len(idx) * data.channels * data.resolution**2
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    if ram and need > ram // 2:
        raise Mgd3Error(f"the {split} split needs {need / 2**30:.1f} GiB in memory ({len(idx)} images at "
                        f"{data.resolution}px); use --limit or a smaller --resolution")
    loader = torch.utils.data.DataLoader(data.dataset(idx), batch_size=256, num_workers=0)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"load {split}", disable=not cfg.progress, leave=False):
        xs.append(to_uint8(x))
        ys.append(torch.as_tensor(y, dtype=torch.long))
    return data, torch.cat(xs), torch.cat(ys)
