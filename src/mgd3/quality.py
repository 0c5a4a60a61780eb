"""Model quality numbers for a pretrained pipeline (used by `mgd3 pretrain --quality` and the
model card): VAE reconstruction PSNR, class fidelity and classification accuracy score (CAS).

Classifier: ConvNet-3 of the DC protocol (Zhao et al., 2021): 3 x [conv 3x3, 128 ch, instance
norm (GroupNorm(128, 128)), ReLU, AvgPool 2x2] + linear; for 28x28 input the first conv pads 3.
SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x 0.1 at half the epochs.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class ConvNet(nn.Module):
    """DC-protocol ConvNet: `depth` blocks of conv-instancenorm-relu-avgpool, then a linear layer."""

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 3, width: int = 128):
        super().__init__()
        layers, c, r = [], channels, resolution
        for d in range(depth):
            pad = 3 if (d == 0 and resolution == 28) else 1
            layers += [nn.Conv2d(c, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            r = (r + 2 * pad - 2) // 2
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * r * r, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int,
                     seed: int = 0, device="cpu", batch_size: int = 256, lr: float = 0.01,
                     progress: bool = False) -> nn.Module:
    """ConvNet-3 on images in [-1, 1] (kept as tensors on the device), DC-protocol optimiser."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ConvNet(images.shape[1], num_classes, images.shape[-1]).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    x, y = images.to(device), labels.to(device)
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress, leave=False):
        net.train()
        perm = torch.randperm(len(x), generator=g).to(device)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, device="cpu", bs: int = 1000) -> float:
    correct = 0
    for i in range(0, len(images), bs):
        correct += (net(images[i:i + bs].to(device)).argmax(1).cpu() == labels[i:i + bs]).sum().item()
    return 100.0 * correct / len(images)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float(10 * math.log10(4.0 / max(mse, 1e-12)))


def per_class_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    idx = [rng.choice(np.flatnonzero(labels.numpy() == c), n, replace=False) for c in labels.unique().tolist()]
    return torch.from_numpy(np.concatenate(idx))


def load_set_images(out) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, R, R) in [-1, 1] and class indices of a distilled set, read from its PNGs."""
    from PIL import Image

    from mgd3.store import read_set

    s = read_set(out, allow_image_folder=False)
    arrs = []
    for f in s.files:
        with Image.open(f) as im:
            arrs.append(np.asarray(im))
    x = torch.from_numpy(np.stack(arrs)).float() / 127.5 - 1.0
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(s.targets, dtype=torch.int64)


def measure(model_dir, data_name: str, *, device="cpu", fidelity_per_class: int = 100, cas_ipc: int = 50,
            real_epochs: int = 10, cas_epochs: int = 300, cfg: float | None = None, seed: int = 0,
            workdir=None, progress: bool = False) -> dict:
    """Class fidelity, CAS vs random real, VAE PSNR of a model folder, measured with mgd3's own code."""
    import tempfile
    from pathlib import Path

    from mgd3.backends import load_backend
    from mgd3.data import load_data
    from mgd3.distill import DistillConfig, distill
    from mgd3.methods import SamplerConfig

    b = load_backend(model_dir, device=device)
    kw = dict(resolution=b.resolution, channels=b.image_channels)
    train, test = load_data(data_name, "train", **kw), load_data(data_name, "test", **kw)

    def tensors(d):
        loader = torch.utils.data.DataLoader(d.dataset(), batch_size=1000)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    xtr, ytr = tensors(train)
    xte, yte = tensors(test)
    k = len(train.class_ids)
    rec = torch.cat([b.decode(b.encode(xte[i:i + 500])).cpu() for i in range(0, min(len(xte), 2000), 500)])
    out = {"vae_test_psnr_db": round(psnr(rec, xte[: len(rec)]), 2)}

    real_net = train_classifier(xtr, ytr, k, epochs=real_epochs, seed=seed, device=device, progress=progress)
    out["real_classifier_test_acc"] = round(accuracy(real_net, xte, yte, device), 2)
    work = Path(workdir or tempfile.mkdtemp(prefix="mgd3-quality-"))
    n = max(fidelity_per_class, cas_ipc)
    distill(DistillConfig(data=data_name, out=str(work / "plain"), model=str(model_dir), method="plain", ipc=n,
                          seed=seed, batch_size=500, device=str(device), overwrite=True, progress=progress,
                          sampler=SamplerConfig(cfg=cfg)))
    xs, ys = load_set_images(work / "plain")
    fid = torch.cat([torch.nonzero(ys == c).flatten()[:fidelity_per_class] for c in range(k)])
    out["class_fidelity_acc"] = round(accuracy(real_net, xs[fid], ys[fid], device), 2)
    cas = torch.cat([torch.nonzero(ys == c).flatten()[:cas_ipc] for c in range(k)])
    syn_net = train_classifier(xs[cas], ys[cas], k, epochs=cas_epochs, seed=seed, device=device)
    out[f"cas_acc_{cas_ipc}_per_class_generated"] = round(accuracy(syn_net, xte, yte, device), 2)
    real_idx = per_class_subset(ytr, cas_ipc, seed)
    real_sub = train_classifier(xtr[real_idx], ytr[real_idx], k, epochs=cas_epochs, seed=seed, device=device)
    out[f"acc_{cas_ipc}_per_class_random_real"] = round(accuracy(real_sub, xte, yte, device), 2)
    out["settings"] = (f"ConvNet-3 (DC optimiser); real classifier {real_epochs} epochs on the full train set; "
                       f"{fidelity_per_class}/class plain samples (CFG {cfg if cfg is not None else b.defaults.get('cfg', 4.0)}, "
                       f"50 DDPM steps); CAS and random-real: {cas_ipc}/class, {cas_epochs} epochs, seed {seed}")
    return out
