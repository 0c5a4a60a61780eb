"""Model quality numbers for a pretrained pipeline (used by `mgd3 pretrain --quality` and the
model card): VAE reconstruction PSNR, class fidelity and classification accuracy score (CAS).

Classifiers are trained with the evaluation stage's networks and loop (`mgd3.evaluation`):
ConvNet-3 under the DC protocol (Zhao et al., 2021; SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 256, lr x 0.1 at half the epochs), no augmentation, on images scaled to [-1, 1].
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from mgd3.evaluation.protocols import Protocol, get_protocol, override
from mgd3.evaluation.train import Normalization, RunOptions, TensorSet, accuracy, tensor_set, train_and_test

log = logging.getLogger(__name__)


def protocol(epochs: int) -> Protocol:
    """The DC protocol for `epochs` epochs, lr x 0.1 from epoch epochs // 2 on (no extra pass)."""
    return override(get_protocol("dc"), epochs=epochs, dc_extra_epoch=False)


def minus_one_to_one(channels: int) -> Normalization:
    """uint8 pixels -> [-1, 1] (what the diffusion model sees), as an evaluation normalization."""
    return Normalization((0.5,) * channels, (0.5,) * channels, "[-1, 1]")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float(10 * math.log10(4.0 / max(mse, 1e-12)))


def per_class_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    idx = [rng.choice(np.flatnonzero(labels.numpy() == c), n, replace=False) for c in labels.unique().tolist()]
    return torch.from_numpy(np.concatenate(idx))


def subset(s: TensorSet, idx: torch.Tensor) -> TensorSet:
    return TensorSet(s.images[idx], s.targets[idx])


def train_classifier(train: TensorSet, test: TensorSet, num_classes: int, *, epochs: int, seed: int = 0,
                     device="cpu", progress: bool = False) -> tuple[torch.nn.Module, float]:
    """A ConvNet-3 trained on `train` (uint8 images) under `protocol(epochs)`; returns it and its
    test accuracy (%) on `test`."""
    r = train_and_test(protocol(epochs), train, test, seed=seed, num_classes=num_classes,
                       norm=minus_one_to_one(train.images.shape[1]),
                       opts=RunOptions(device=str(device), progress=progress), return_model=True)
    return r["model"].eval(), r["final_acc"]


def classifier_accuracy(model: torch.nn.Module, s: TensorSet, device="cpu") -> float:
    """Top-1 accuracy (%) of a `train_classifier` network on `s`."""
    return accuracy(model, s, minus_one_to_one(s.images.shape[1]), device=torch.device(device))


def measure(model_dir, data_name: str, *, device="cpu", fidelity_per_class: int = 100, cas_ipc: int = 50,
            real_epochs: int = 10, cas_epochs: int = 300, cfg: float | None = None, seed: int = 0,
            workdir=None, progress: bool = False) -> dict:
    """Class fidelity, CAS vs random real, VAE PSNR of a model folder, measured with mgd3's own code."""
    import tempfile
    from pathlib import Path

    from mgd3.backends import load_backend
    from mgd3.io.data import load_data
    from mgd3.io.set_reader import load_set
    from mgd3.run.driver import distill
    from mgd3.run.settings import DistillConfig
    from mgd3.methods import SamplerConfig

    b = load_backend(model_dir, device=device)
    kw = dict(resolution=b.resolution, channels=b.image_channels)
    train_data, test_data = load_data(data_name, "train", **kw), load_data(data_name, "test", **kw)
    train, test = tensor_set(train_data.dataset(), batch_size=1000), tensor_set(test_data.dataset(), batch_size=1000)
    k = len(train_data.class_ids)

    x = test.images[:2000].float() / 127.5 - 1.0  # (n, C, R, R) in [-1, 1]
    rec = torch.cat([b.decode(b.encode(x[i:i + 500])).cpu() for i in range(0, len(x), 500)])
    out = {"vae_test_psnr_db": round(psnr(rec, x), 2)}

    real_net, real_acc = train_classifier(train, test, k, epochs=real_epochs, seed=seed, device=device,
                                          progress=progress)
    out["real_classifier_test_acc"] = round(real_acc, 2)
    work = Path(workdir or tempfile.mkdtemp(prefix="mgd3-quality-"))
    n = max(fidelity_per_class, cas_ipc)
    distill(DistillConfig(data=data_name, out=str(work / "plain"), model=str(model_dir), method="plain", ipc=n,
                          seed=seed, batch_size=500, device=str(device), overwrite=True, progress=progress,
                          sampler=SamplerConfig(cfg=cfg)))
    generated = load_set(work / "plain")
    made = TensorSet(generated.images, generated.labels)
    fid = torch.cat([torch.nonzero(made.targets == c).flatten()[:fidelity_per_class] for c in range(k)])
    out["class_fidelity_acc"] = round(classifier_accuracy(real_net, subset(made, fid), device), 2)
    cas = torch.cat([torch.nonzero(made.targets == c).flatten()[:cas_ipc] for c in range(k)])
    out[f"cas_acc_{cas_ipc}_per_class_generated"] = round(
        train_classifier(subset(made, cas), test, k, epochs=cas_epochs, seed=seed, device=device)[1], 2)
    out[f"acc_{cas_ipc}_per_class_random_real"] = round(train_classifier(
        subset(train, per_class_subset(train.targets, cas_ipc, seed)), test, k, epochs=cas_epochs, seed=seed,
        device=device)[1], 2)
    scale = cfg if cfg is not None else b.defaults.get("cfg", 4.0)
    out["settings"] = (f"ConvNet-3 (DC protocol of mgd3.evaluation, no augmentation); real classifier {real_epochs} "
                       f"epochs on the full train set; {fidelity_per_class}/class plain samples (CFG {scale}, "
                       f"50 DDPM steps); CAS and random-real: {cas_ipc}/class, {cas_epochs} epochs, seed {seed}")
    return out
