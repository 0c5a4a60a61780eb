"""`mgd3 pretrain`'s settings: its config (`PretrainConfig`), the DiT size presets, the fixed
noise schedule, the names it writes into OUT, and the rules and checks that need no data (the
generic machinery is `mgd3.config`). Every stage of `mgd3.train.pretrain` reads them; they import
no stage."""

from __future__ import annotations

from dataclasses import dataclass

from mgd3.config import (FINITE_NON_NEGATIVE, POSITIVE, RANDOM_STATE_MAX, Rule, check_device, check_rules, check_types,
                         convert, fill)
from mgd3.errors import Mgd3Error

# DiT size presets (a plain dict registry): layers, heads, head dim, patch. hidden = heads × head dim.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, patch_size=1),  # 0.06 M params
    "small": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=1),  # 1.4 M
    "medium": dict(num_layers=6, num_attention_heads=6, attention_head_dim=32, patch_size=1),  # 4.6 M
    "base": dict(num_layers=8, num_attention_heads=8, attention_head_dim=32, patch_size=1),  # 10.7 M
}

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
# what a finished or running `mgd3 pretrain` writes into OUT (anything else there is the user's)
OUTPUTS = ("model_index.json", "transformer", "vae", "scheduler", "mgd3.json", "MODEL_CARD.md", "samples",
           ".checkpoints", ".save", "unet", "class_embedder")
# config fields that fix the data and the VAE / the DiT: a checkpoint made with other values cannot continue
VAE_KEYS = ("data", "classes", "data_root", "resolution", "channels", "limit", "seed", "latent_channels",
            "vae_levels", "vae_width", "vae")
DIT_KEYS = VAE_KEYS + ("size", "patch_size", "vae_epochs", "arch")


@dataclass
class PretrainConfig:
    data: str
    out: str
    classes: list[str] | None = None
    data_root: str | None = None
    resolution: int | None = None  # None: the data's native size
    channels: int | None = None  # None: the data's
    # VAE
    latent_channels: int = 4
    vae_levels: int = 3  # resolution levels; 2 ** (levels - 1) downsampling: 28x28 -> 7x7
    vae_width: int = 16
    vae_epochs: int = 3
    vae_batch_size: int | None = 32  # None: batch_size (small batches: more updates per CPU second)
    vae_lr: float = 1e-3
    vae_loss: str = "mse"  # "mse" or "l1"
    kl_weight: float = 1e-6
    vae: str | None = None  # reuse this pipeline folder's vae/ instead of training one
    vae_decoder_epochs: int = 0  # with vae: train its decoder this many epochs, the encoder frozen
    # DiT (or, with arch "unet", the class-conditional latent UNet of mgd3.backends.unet)
    arch: str | None = None  # None: dit
    size: str = "small"
    init: str | None = None  # start the DiT and its EMA from this pipeline folder's transformer/
    patch_size: int | None = None  # None: the size preset's
    epochs: int = 20
    train_steps: int | None = None  # DiT optimiser steps in total, instead of `epochs`
    batch_size: int = 256
    lr: float = 3e-4
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    cfg: float = 2.0  # recommended CFG scale written to mgd3.json
    # run
    bf16: bool = False
    seed: int = 0
    device: str = "auto"
    limit: int | None = None  # use only N random train images
    max_steps: int | None = None  # at most N optimiser steps per epoch (smoke tests)
    max_minutes: float | None = None  # DiT time budget per invocation; the epoch it ends counts as done
    quality: bool = False  # measure class fidelity / CAS / PSNR after training (mgd3.train.quality)
    quality_real_epochs: int = 10
    quality_cas_epochs: int = 300
    overwrite: bool = False
    progress: bool = True
    command: str = ""


def dit_size(cfg: PretrainConfig) -> dict[str, int]:
    """The DiT arguments of the --size preset, with --patch-size applied."""
    if cfg.size not in SIZES:
        raise Mgd3Error(f"unknown --size {cfg.size!r}; known: {', '.join(SIZES)}")
    size = dict(SIZES[cfg.size])
    if cfg.patch_size is not None:
        size["patch_size"] = cfg.patch_size
    return size


# --- settings: rules and checks that need no data (the generic machinery is mgd3.config)


def _size_names():
    return list(SIZES)


PRETRAIN_RULES: dict[str, Rule] = {
    "resolution": Rule(minimum=2, maximum=4096), "channels": Rule(choices=(1, 3)),
    "latent_channels": Rule(minimum=1, maximum=64), "vae_levels": Rule(minimum=1, maximum=8),
    "vae_width": Rule(minimum=1, maximum=1024), "vae_epochs": Rule(minimum=1, maximum=100_000),
    "vae_batch_size": Rule(minimum=1, maximum=1_000_000), "vae_lr": Rule(above=0.0, maximum=10.0),
    "vae_loss": Rule(choices=("mse", "l1")), "kl_weight": Rule(minimum=0.0),
    "size": Rule(choices=_size_names), "patch_size": Rule(minimum=1, maximum=64),
    "epochs": Rule(minimum=0, maximum=1_000_000), "train_steps": Rule(minimum=1, maximum=10**9),
    "vae_decoder_epochs": Rule(minimum=0, maximum=100_000),
    "batch_size": Rule(minimum=1, maximum=1_000_000), "lr": Rule(above=0.0, maximum=10.0),
    "ema_decay": Rule(minimum=0.0, below=1.0), "label_dropout": Rule(minimum=0.0, below=1.0),
    "cfg": FINITE_NON_NEGATIVE, "seed": Rule(minimum=0, maximum=RANDOM_STATE_MAX), "limit": POSITIVE,
    "max_steps": POSITIVE, "max_minutes": Rule(above=0.0), "quality_real_epochs": Rule(minimum=1),
    "quality_cas_epochs": Rule(minimum=1), "arch": Rule(choices=("dit", "unet")),
}


def pretrain_config(values: dict, source: str = "--config", command: str = ""):
    """A checked `PretrainConfig` from merged flag / YAML values (`mgd3.config.merged`)."""
    quiet = convert("quiet", values.pop("quiet", False), "bool", source)
    top = fill(PretrainConfig, values, source, skip=("progress", "command"))
    for req in ("data", "out"):
        if req not in top:
            raise Mgd3Error(f"--{req} is required")
    cfg = PretrainConfig(**top, progress=not quiet, command=command)
    validate_pretrain(cfg)
    return cfg


def validate_pretrain(cfg) -> None:
    """Types, ranges and choices (`PRETRAIN_RULES`) and the device: the checks that need no data."""
    check_types(cfg)
    check_rules(cfg, PRETRAIN_RULES)
    check_device(cfg.device)
