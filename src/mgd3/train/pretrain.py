"""Stage 0 (optional): `mgd3 pretrain` — train a VAE and a class-conditional latent DiT on a
dataset and write a diffusers DiT pipeline folder that `mgd3.backends` loads exactly like
`facebook/DiT-XL-2-256` (Peebles & Xie, 2023; latent diffusion: Rombach et al., 2022).

Stages, in the order they run:
  1. AutoencoderKL (diffusers): reconstruction (MSE or L1) + a small KL term, cosine lr decay.
     Or (--vae) a pipeline folder's VAE, reused; --vae-decoder-epochs then trains only its
     decoder, the encoder frozen: the latents stay exactly the same, so a DiT trained on them
     (--init) still fits, and only decoding gets sharper.
  2. Latent scaling factor = 1 / std of the train latents' means (as Stable Diffusion's 0.18215
     was chosen), stored in the VAE config so every loader scales the same way.
  3. The train set encoded once (posterior means), kept in memory.
  4. DiTTransformer2DModel (ada-norm-zero, with the DiT paper's adaLN-Zero initialisation) on
     the scaled latents: ε-prediction, plain MSE, the linear 1e-4..0.02 schedule over 1000
     steps, EMA weights (with warm-up). Fixed variance: a learned range would need the hybrid
     VLB loss (Nichol & Dhariwal, 2021), which pays off for few-step sampling; mgd3 samples
     with 50 DDPM steps, where the posterior variance is what the sampler uses for a
     fixed-variance model (docs/METHODS.md §1.3). Label dropout for classifier-free guidance is done here
     by replacing labels with the null class (index = number of classes); every block's own
     LabelEmbedding dropout is switched off.
  5. Save: transformer/ (EMA weights), vae/, scheduler/ (DDIM config, clip_sample False),
     mgd3.json (recommended sampling settings + the resolved config + training stats),
     MODEL_CARD.md, and model_index.json last: its presence means the folder is complete.

Checkpoints after every epoch in OUT/.checkpoints make a re-run of the same command continue
where it stopped; a re-run with a larger --epochs (or --train-steps) continues a finished
model's training. Images are held in memory as uint8 during training.

This module runs the stages in order (stage 2 and the save are here) and holds the CLI; the
settings are in `pretrain_settings`, the images in memory in `pretrain_data`, the networks in
`latent_models`, OUT and its checkpoints in `checkpoints`, stages 1 and 3 in `vae_stage`, stage 4
in `dit_stage`, MODEL_CARD.md in `model_card`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from mgd3.errors import Mgd3Error
from mgd3.train.checkpoints import Checkpoints, prepare_out
from mgd3.train.dit_stage import init_dir, train_dit
from mgd3.train.latent_models import torch_device
from mgd3.train.model_card import write_model_card
from mgd3.train.pretrain_data import load_split
from mgd3.train.pretrain_settings import (BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, SIZES, PretrainConfig, dit_size,
                                          pretrain_config, validate_pretrain)
from mgd3.train.vae_stage import encode_all, reconstruction_psnr, train_vae, tune_decoder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the stage


def _validate(cfg: PretrainConfig) -> None:
    validate_pretrain(cfg)
    dit_size(cfg)
    if cfg.epochs < (0 if cfg.init else 1):
        raise Mgd3Error(f"--epochs must be at least 1 (0 only with --init: the DiT is copied as it is), "
                        f"got {cfg.epochs}")
    if cfg.vae_decoder_epochs and not cfg.vae:
        raise Mgd3Error("--vae-decoder-epochs trains the decoder of a reused VAE; give --vae MODEL_DIR (a VAE "
                        "trained here trains whole: --vae-epochs)")
    for name, v in (("--vae-epochs", cfg.vae_epochs), ("--batch-size", cfg.batch_size),
                    ("--vae-levels", cfg.vae_levels), ("--vae-width", cfg.vae_width),
                    ("--latent-channels", cfg.latent_channels)):
        if v < 1:
            raise Mgd3Error(f"{name} must be at least 1, got {v}")
    for name, v in (("--limit", cfg.limit), ("--max-steps", cfg.max_steps), ("--vae-batch-size", cfg.vae_batch_size),
                    ("--patch-size", cfg.patch_size), ("--train-steps", cfg.train_steps)):
        if v is not None and v < 1:
            raise Mgd3Error(f"{name} must be at least 1, got {v}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise Mgd3Error("--max-minutes must be positive")
    if not 0 <= cfg.label_dropout < 1:
        raise Mgd3Error(f"--label-dropout must be in [0, 1), got {cfg.label_dropout}")
    if not 0 <= cfg.ema_decay < 1:
        raise Mgd3Error(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not (cfg.lr > 0 and cfg.vae_lr > 0):
        raise Mgd3Error("--lr and --vae-lr must be positive")
    if cfg.vae_loss not in ("mse", "l1"):
        raise Mgd3Error(f"unknown --vae-loss {cfg.vae_loss!r}; known: l1, mse")
    if cfg.init:
        if cfg.arch == "unet":
            raise Mgd3Error("--init starts a DiT from a pipeline folder's transformer; it does not take --arch unet")
        init_dir(cfg.init)


def pretrain(cfg: PretrainConfig) -> Path:
    """Train (or continue training) and write the pipeline folder; returns it."""
    _validate(cfg)
    if cfg.vae:  # the reused VAE fixes the latent space
        from mgd3.backends.unet import reused_vae_settings

        cfg.latent_channels, cfg.vae_levels, cfg.vae_width = reused_vae_settings(cfg.vae)
    device = torch_device(cfg.device)
    t_all = time.perf_counter()
    data, images, targets = load_split(cfg, "train", cfg.limit)  # before touching OUT: bad data fails first
    down = 2 ** (cfg.vae_levels - 1)
    if data.resolution % down or (data.resolution // down) % dit_size(cfg)["patch_size"]:
        raise Mgd3Error(f"resolution {data.resolution} is not divisible by the VAE's downsampling {down} "
                        f"(--vae-levels {cfg.vae_levels}) times the patch size; pass --resolution or --vae-levels")
    out, ckpt = prepare_out(cfg)
    test = load_split(cfg, "test")
    num_classes = len(data.class_ids)
    stats: dict = {}

    vae = _autoencoder(cfg, images, test, ckpt, device, stats)  # 1. VAE
    scaling_factor, latents, val = _encode(cfg, vae, images, test, device, stats)  # 2.-3.
    # 4. DiT
    ema = train_dit(cfg, latents, targets, num_classes, ckpt, device, stats, vae=vae,
                    scaling_factor=scaling_factor, out=out, val=val)
    if test is not None:
        stats["vae_test_psnr_db"] = round(reconstruction_psnr(vae, test[1], device), 2)
    # every invocation that reached the save, with its wall time (interrupted ones live on in the epoch times)
    stats["runs"] = ckpt.add_run({"command": cfg.command, "seconds": round(time.perf_counter() - t_all, 1),
                                  "device": str(device),
                                  "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})

    # 5. save; model_index.json last
    id2label = {str(i): n for i, n in enumerate(data.class_names)}
    index = _write_pipeline(out, cfg, ema, vae, id2label)
    info = _model_info(cfg, data, len(images), stats, ema, vae, scaling_factor, device)
    (out / "mgd3.json").write_text(json.dumps(info, indent=2, default=str))
    write_model_card(out, cfg, data, stats, info["transformer_params"], device)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))  # last: the folder is complete
    log.info("wrote %s (%.0f s)", out, time.perf_counter() - t_all)
    if cfg.quality:
        add_quality(out, cfg, device)
    return out


def _autoencoder(cfg: PretrainConfig, images: Tensor, test, ckpt: Checkpoints, device, stats: dict):
    """Stage 1: a VAE trained here, or the reused one of --vae (its decoder trained with
    --vae-decoder-epochs); frozen, in eval mode. test: (data, images, targets) or None."""
    if cfg.vae:
        from mgd3.backends.unet import load_reused_vae

        vae = load_reused_vae(cfg.vae, images.shape[1], images.shape[-1]).to(device)
        if cfg.vae_decoder_epochs:
            if test is not None and "vae_test_psnr_db_before" not in stats:
                stats["vae_test_psnr_db_before"] = round(reconstruction_psnr(vae, test[1], device), 2)
            vae = tune_decoder(cfg, vae, images, ckpt, device, stats)
    else:
        vae = train_vae(cfg, images, ckpt, device, stats)
    return vae


def _encode(cfg: PretrainConfig, vae, images: Tensor, test, device, stats: dict) -> tuple[float, Tensor, tuple | None]:
    """Stages 2-3: the latent scaling factor (stored in the VAE's config), the scaled train latents
    (N, c, h, w) and the held-out (latents, labels) of at most 2000 test images (None without a test split)."""
    t = time.perf_counter()
    mean_latents = encode_all(vae, images, device)  # (N, c, h, w)
    if cfg.vae and cfg.init:  # the DiT of --init was trained on latents scaled by the reused VAE's factor
        scaling_factor = float(vae.config.scaling_factor)
    else:
        scaling_factor = float(1.0 / mean_latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = mean_latents * scaling_factor
    val = None
    if test is not None:
        n_val = min(len(test[1]), 2000)
        val = (encode_all(vae, test[1][:n_val], device) * scaling_factor, test[2][:n_val])
    stats["encode_s"] = round(time.perf_counter() - t, 2)
    return scaling_factor, latents, val


def _write_pipeline(out: Path, cfg: PretrainConfig, ema, vae, id2label: dict[str, str]) -> dict:
    """transformer/ (or unet/ and class_embedder/), vae/ and scheduler/ (DDIM, clip_sample False),
    written in OUT/.save and moved into OUT; returns the model_index.json to write last."""
    from diffusers import DDIMScheduler, DiTPipeline

    scheduler = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                              beta_schedule="linear", clip_sample=False)
    tmp = out / ".save"
    if tmp.exists():
        shutil.rmtree(tmp)
    subs = ("transformer", "vae", "scheduler")
    if cfg.arch == "unet":
        from mgd3.backends.unet import SUBFOLDERS, save_pipeline

        save_pipeline(tmp, ema.unet.cpu(), ema.class_embedder.cpu(), vae.cpu(), scheduler, id2label)
        subs = SUBFOLDERS
    else:
        DiTPipeline(transformer=ema.cpu(), vae=vae.cpu(), scheduler=scheduler,
                    id2label=id2label).save_pretrained(tmp, safe_serialization=True)
    for sub in subs:
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        os.replace(tmp / sub, out / sub)
    index = json.loads((tmp / "model_index.json").read_text())
    index["id2label"] = id2label  # where the hub's DiT-XL-2-256 folder keeps it
    shutil.rmtree(tmp)
    return index


def _model_info(cfg: PretrainConfig, data, train_images: int, stats: dict, ema, vae, scaling_factor: float,
                device) -> dict:
    """mgd3.json: the recommended sampling settings, the data, the resolved config, the training stats."""
    return {
        "defaults": {"cfg": cfg.cfg},
        "trained_by": "mgd3 pretrain",
        "data": {"name": cfg.data, "classes": data.class_ids, "class_names": data.class_names,
                 "resolution": data.resolution, "channels": data.channels, "train_images": train_images,
                 "fingerprint": data.fingerprint()},
        "config": dataclasses.asdict(cfg),
        "stats": stats,
        "transformer_params": sum(p.numel() for p in ema.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scaling_factor,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                    "threads": torch.get_num_threads()},
    }


def add_quality(out: Path, cfg: PretrainConfig, device) -> dict:
    """Measure class fidelity, CAS vs random real and VAE PSNR (mgd3.train.quality), then add them to
    MODEL_CARD.md and mgd3.json."""
    import tempfile

    from mgd3.io.data import load_data
    from mgd3.train.quality import measure

    if cfg.classes:
        raise Mgd3Error("--quality measures a model of all the data's classes; train without --classes")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mgd3-quality-") as work:
        q = measure(out, cfg.data, device=str(device), real_epochs=cfg.quality_real_epochs,
                    cas_epochs=cfg.quality_cas_epochs, seed=cfg.seed, workdir=work, progress=cfg.progress)
    q["measure_s"] = round(time.perf_counter() - t, 1)
    q["command"] = (f"mgd3.train.quality.measure({str(out)!r}, {cfg.data!r}, real_epochs={cfg.quality_real_epochs}, "
                    f"cas_epochs={cfg.quality_cas_epochs}, seed={cfg.seed})")
    info = json.loads((out / "mgd3.json").read_text())
    info["quality"] = q
    (out / "mgd3.json").write_text(json.dumps(info, indent=2, default=str))
    data = load_data(cfg.data, "train", resolution=cfg.resolution, channels=cfg.channels, data_root=cfg.data_root)
    write_model_card(out, cfg, data, info["stats"], info["transformer_params"], device, quality=q)
    log.info("quality: %s", {k: v for k, v in q.items() if k not in ("settings", "command")})
    return q


# --------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    """Add the `pretrain` sub-command."""
    d = PretrainConfig(data="", out="")
    p = sub.add_parser(
        "pretrain", help="train a VAE + class-conditional latent DiT and write a DiT pipeline folder",
        description="Train an AutoencoderKL and then a class-conditional latent DiT on a dataset, and write "
                    "a diffusers DiT pipeline folder (OUT/model_index.json, transformer/, vae/, scheduler/, "
                    "mgd3.json, MODEL_CARD.md, samples/epoch_XXX.png). Checkpoints after every epoch in "
                    "OUT/.checkpoints: re-running the same command continues; a larger --epochs continues a "
                    "finished model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_options(p)
    _add_vae_options(p, d)
    _add_dit_options(p, d)
    _add_run_options(p, d)
    from mgd3.config import suppress_defaults

    suppress_defaults(p)
    p.set_defaults(func=run)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """The "data and output" flags: what to train on and where to write."""
    g = p.add_argument_group("data and output")
    g.add_argument("--data", metavar="NAME_OR_PATH",
                   help="dataset: fashion-mnist, digits, an ImageNet subset name, or an image folder")
    g.add_argument("--out", metavar="DIR", help="output pipeline folder (required)")
    g.add_argument("--classes", nargs="+", metavar="CLASS", help="train on these classes only (ids or names)")
    g.add_argument("--data-root", help="ImageNet-1K root for the named ImageNet subsets")
    g.add_argument("--resolution", type=int, help="image size (default: the data's native size)")
    g.add_argument("--channels", type=int, choices=[1, 3], help="image channels (default: the data's)")
    g.add_argument("--limit", type=int, metavar="N", help="use only N random train images (smoke tests)")
    g.add_argument("--overwrite", action="store_true", help="delete a finished model or checkpoints in OUT first")


def _add_vae_options(p: argparse.ArgumentParser, d: PretrainConfig) -> None:
    """The "VAE" flags: train one, or reuse (and tune) another pipeline's."""
    g = p.add_argument_group("VAE")
    g.add_argument("--vae-epochs", type=int, default=d.vae_epochs, help="VAE training epochs")
    g.add_argument("--vae-levels", type=int, default=d.vae_levels,
                   help="VAE resolution levels; the latent is 2^(levels-1) times smaller (3: 28x28 -> 7x7)")
    g.add_argument("--vae-width", type=int, default=d.vae_width, help="VAE channels at full resolution")
    g.add_argument("--latent-channels", type=int, default=d.latent_channels, help="VAE latent channels")
    g.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size, help="VAE batch size")
    g.add_argument("--vae-lr", type=float, default=d.vae_lr, help="VAE learning rate (AdamW, cosine decay)")
    g.add_argument("--vae-loss", choices=["mse", "l1"], default=d.vae_loss, help="VAE reconstruction loss")
    g.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the per-pixel KL term")
    g.add_argument("--vae", metavar="MODEL_DIR", help="reuse the vae/ of this pipeline folder (e.g. the shipped "
                                                      "model) instead of training one; only the denoiser trains")
    g.add_argument("--vae-decoder-epochs", type=int, default=d.vae_decoder_epochs, metavar="N",
                   help="with --vae: train the reused VAE's decoder for N epochs, its encoder frozen (the latents "
                        "stay the same, so with --init MODEL_DIR --epochs 0 the model's DiT is kept as it is and "
                        "only decoding sharpens); --vae-lr, --vae-batch-size and --vae-loss apply")


def _add_dit_options(p: argparse.ArgumentParser, d: PretrainConfig) -> None:
    """The "DiT" flags: the denoiser, its size and its training."""
    g = p.add_argument_group("DiT")
    g.add_argument("--arch", choices=["dit", "unet"],
                   help="denoiser: dit (default) or unet, the class-conditional latent UNet of the CompVis cin256 "
                        "design (mgd3.backends.unet; --size picks its preset of the same name)")
    g.add_argument("--size", default=d.size, choices=list(SIZES),
                   help="DiT size preset: " + "; ".join(
                       f"{k}: {v['num_layers']} layers, {v['num_attention_heads']}x{v['attention_head_dim']}"
                       for k, v in SIZES.items()))
    g.add_argument("--init", metavar="MODEL_DIR",
                   help="start the DiT (and its EMA) from this pipeline folder's transformer (e.g. the shipped "
                        "model, with --vae MODEL_DIR and its --size) instead of random weights; the optimiser "
                        "starts afresh and --epochs counts the epochs of this run")
    g.add_argument("--patch-size", type=int, help="DiT patch size (default: the preset's, 1)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="DiT training epochs (0 with --init: keep that DiT)")
    g.add_argument("--train-steps", type=int, metavar="N",
                   help="train the DiT for N optimiser steps in total instead of --epochs (the last epoch may be "
                        "partial)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="DiT training batch size")
    g.add_argument("--lr", type=float, default=d.lr, help="DiT learning rate (AdamW, constant)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay per step (the EMA is shipped)")
    g.add_argument("--label-dropout", type=float, default=d.label_dropout,
                   help="probability of training on the null class (for classifier-free guidance)")
    g.add_argument("--cfg", type=float, default=d.cfg, help="recommended CFG scale written to mgd3.json")
    g.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop DiT training after M minutes (this run); the epoch it ends counts as done")


def _add_run_options(p: argparse.ArgumentParser, d: PretrainConfig) -> None:
    """The "run" flags: device, seed, threads, quality, --config, --quiet."""
    g = p.add_argument_group("run")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on recent CPUs and GPUs)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--seed", type=int, default=d.seed, help="training seed")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--max-steps", type=int, metavar="N", help="at most N optimiser steps per epoch (smoke tests)")
    g.add_argument("--quality", action="store_true",
                   help="after training, measure class fidelity, classification accuracy score and VAE PSNR "
                        "(mgd3.train.quality) and add them to MODEL_CARD.md")
    g.add_argument("--quality-real-epochs", type=int, default=d.quality_real_epochs,
                   help="epochs of the real-data ConvNet-3 that scores class fidelity")
    g.add_argument("--quality-cas-epochs", type=int, default=d.quality_cas_epochs,
                   help="epochs of the ConvNet-3s trained on 50 generated / 50 real images per class")
    g.add_argument("--config", help="YAML file with any of these options (flag names without --); "
                                    "flags given on the command line win")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    """`mgd3 pretrain`: build the config from the flags (and --config YAML) and train."""
    from mgd3.config import Rule, convert, merged

    values, source = merged(args)
    threads = values.pop("threads", None)
    if threads is not None:
        threads = convert("threads", threads, "int", source)
        Rule(minimum=1, maximum=4096).check("--threads", threads)
    if values.get("arch") == "dit":
        values["arch"] = None  # the default; checkpoints of older runs carry no arch
    cfg = pretrain_config(values, source, command="mgd3 " + " ".join(sys.argv[1:]))
    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    out = pretrain(cfg)
    print(f"wrote model {out} in {(time.perf_counter() - t) / 60:.1f} min; card: {out}/MODEL_CARD.md; "
          f"samples: {out}/samples/; use it with: mgd3 distill --data {cfg.data} --model {out}")
    return 0
