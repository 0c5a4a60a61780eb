"""Stages 1 and 3 of `mgd3 pretrain`: train the AutoencoderKL (or only the decoder of a reused
one), encode the train set to posterior means, and measure reconstruction PSNR."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mgd3.train.checkpoints import Checkpoints, restoring, signature
from mgd3.train.latent_models import autocast, build_vae
from mgd3.train.pretrain_data import to_float
from mgd3.train.pretrain_settings import VAE_KEYS, PretrainConfig

log = logging.getLogger(__name__)


def epoch_batches(n: int, bs: int, gen: torch.Generator, max_steps: int | None) -> list[Tensor]:
    """One epoch's batches of indices into n items, shuffled by gen (at most max_steps of them)."""
    perm = torch.randperm(n, generator=gen)
    out = [perm[i:i + bs] for i in range(0, n, bs)]
    return out[:max_steps] if max_steps else out


def _continue(ckpt: Checkpoints, stage: str, model, opt, gen: torch.Generator, stats: dict) -> tuple[int, int]:
    """Restore a VAE stage's checkpoint (model, optimiser, generator, stats) if there is one;
    returns (epochs done, steps done)."""
    state = ckpt.load(stage)
    if not state:
        return 0, 0
    with restoring(ckpt, stage):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, step = int(state["epoch"]), int(state["step"])
    stats.update(state["stats"])
    log.info("%s: continuing after epoch %d", "VAE" if stage == "vae" else f"VAE {stage}", start)
    return start, step


def _set_cosine_lr(opt, lr: float, step: int, total: int) -> None:
    """Cosine decay from lr to 10 % of it over `total` steps."""
    for group in opt.param_groups:
        group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def train_vae(cfg: PretrainConfig, images: Tensor, ckpt: Checkpoints, device, stats: dict):
    """AutoencoderKL on images (N, C, R, R) uint8; returns it in eval mode, frozen."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg, images.shape[1], images.shape[-1]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, step = _continue(ckpt, "vae", vae, opt, gen, stats)
    bs = cfg.vae_batch_size or cfg.batch_size
    total = max(cfg.vae_epochs * min(math.ceil(len(images) / bs), cfg.max_steps or 10**12), 1)
    for epoch in range(start, cfg.vae_epochs):
        t0, c0, losses, recs = time.perf_counter(), time.process_time(), [], []
        vae.train()
        bar = tqdm(epoch_batches(len(images), bs, gen, cfg.max_steps), desc=f"VAE {epoch + 1}/{cfg.vae_epochs}",
                   disable=not cfg.progress, leave=False)
        for idx in bar:
            _set_cosine_lr(opt, cfg.vae_lr, step, total)
            x = to_float(images[idx], device)  # (B, C, R, R)
            noise = torch.randn((len(idx), cfg.latent_channels, *_latent_hw(cfg, images)), generator=gen).to(device)
            with autocast(device, cfg.bf16):
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.mean + post.std * noise).sample
            err = (rec.float() - x).abs() if cfg.vae_loss == "l1" else (rec.float() - x) ** 2
            kl = post.kl().float().mean() / x[0].numel()  # per pixel, like the reconstruction term
            loss = err.mean() + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            recs.append(F.mse_loss(rec.detach().float(), x).item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        stats.setdefault("vae_epoch_s", []).append(round(time.perf_counter() - t0, 2))
        stats.setdefault("vae_epoch_cpu_s", []).append(round(time.process_time() - c0, 2))
        stats.setdefault("vae_loss", []).append(float(np.mean(losses)))
        stats.setdefault("vae_train_psnr_db", []).append(round(10 * math.log10(4.0 / max(np.mean(recs), 1e-12)), 2))
        ckpt.save("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                          "epoch": epoch + 1, "step": step, "stats": stats},
                  {"epoch": epoch + 1, "signature": signature(cfg, VAE_KEYS)})
        log.info("VAE epoch %d/%d: loss %.4f, train PSNR %.2f dB (%.0f s)", epoch + 1, cfg.vae_epochs,
                 stats["vae_loss"][-1], stats["vae_train_psnr_db"][-1], stats["vae_epoch_s"][-1])
    return vae.eval().requires_grad_(False)


def tune_decoder(cfg: PretrainConfig, vae, images: Tensor, ckpt: Checkpoints, device, stats: dict):
    """Train the decoder (post_quant_conv + decoder) of a reused AutoencoderKL on images (N, C, R, R)
    uint8 for `vae_decoder_epochs` epochs, its encoder frozen: the decoder learns to invert the same
    posterior (it decodes posterior samples, as in VAE training; the loss is --vae-loss, no KL term,
    since the posterior does not move). Returns the VAE in eval mode, frozen."""
    trained = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=cfg.vae_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, step = _continue(ckpt, "decoder", vae, opt, gen, stats)
    bs = cfg.vae_batch_size or cfg.batch_size
    total = max(cfg.vae_decoder_epochs * min(math.ceil(len(images) / bs), cfg.max_steps or 10**12), 1)
    for epoch in range(start, cfg.vae_decoder_epochs):
        t0, c0, losses = time.perf_counter(), time.process_time(), []
        vae.decoder.train()
        bar = tqdm(epoch_batches(len(images), bs, gen, cfg.max_steps),
                   desc=f"VAE decoder {epoch + 1}/{cfg.vae_decoder_epochs}", disable=not cfg.progress, leave=False)
        for idx in bar:
            _set_cosine_lr(opt, cfg.vae_lr, step, total)
            x = to_float(images[idx], device)  # (B, C, R, R)
            with torch.no_grad(), autocast(device, cfg.bf16):
                post = vae.encode(x).latent_dist
                z = post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=gen).to(device)
            with autocast(device, cfg.bf16):
                rec = vae.decode(z).sample
            err = (rec.float() - x).abs() if cfg.vae_loss == "l1" else (rec.float() - x) ** 2
            loss = err.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        stats.setdefault("decoder_epoch_s", []).append(round(time.perf_counter() - t0, 2))
        stats.setdefault("decoder_epoch_cpu_s", []).append(round(time.process_time() - c0, 2))
        stats.setdefault("decoder_loss", []).append(float(np.mean(losses)))
        ckpt.save("decoder", {"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                              "epoch": epoch + 1, "step": step, "stats": stats},
                  {"epoch": epoch + 1, "signature": signature(cfg, VAE_KEYS)})
        log.info("VAE decoder epoch %d/%d: %s loss %.4f (%.0f s)", epoch + 1, cfg.vae_decoder_epochs, cfg.vae_loss,
                 stats["decoder_loss"][-1], stats["decoder_epoch_s"][-1])
    return vae.eval().requires_grad_(False)


def _latent_hw(cfg: PretrainConfig, images: Tensor) -> tuple[int, int]:
    s = images.shape[-1] // 2 ** (cfg.vae_levels - 1)
    return s, s


@torch.no_grad()
def encode_all(vae, images: Tensor, device, bs: int = 500) -> Tensor:
    """Posterior means (N, c, h, w) of uint8 images (N, C, R, R), unscaled, float32 on the CPU."""
    return torch.cat([vae.encode(to_float(images[i:i + bs], device)).latent_dist.mean.float().cpu()
                      for i in range(0, len(images), bs)])


@torch.no_grad()
def reconstruction_psnr(vae, images: Tensor, device, bs: int = 500) -> float:
    """PSNR (dB, peak-to-peak 2) of decode(encode mean) over uint8 images (N, C, R, R)."""
    from mgd3.train.quality import psnr

    rec = torch.cat([vae.decode(vae.encode(to_float(images[i:i + bs], device)).latent_dist.mean).sample
                     .clamp(-1, 1).float().cpu() for i in range(0, len(images), bs)])
    return psnr(rec, to_float(images, "cpu"))
