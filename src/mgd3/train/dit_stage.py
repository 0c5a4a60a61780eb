"""Stage 4 of `mgd3 pretrain`: train the class-conditional latent DiT (or UNet) with EMA weights
on the scaled latents, its held-out loss and per-epoch sample grids, starting it from another
pipeline's transformer (--init), and timing one optimiser step (`calibrate`)."""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mgd3.errors import Mgd3Error
from mgd3.train.checkpoints import Checkpoints, restoring, signature
from mgd3.train.latent_models import autocast, build_dit, torch_device
from mgd3.train.pretrain_settings import BETA_END, BETA_START, DIT_KEYS, NUM_TRAIN_TIMESTEPS, PretrainConfig
from mgd3.train.vae_stage import epoch_batches

log = logging.getLogger(__name__)


def _alpha_bar(device) -> Tensor:
    betas = np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas)).float().to(device)  # (T,)


@torch.no_grad()
def eval_loss(dit, latents: Tensor, labels: Tensor, device, bs: int = 500, seed: int = 1234) -> float:
    """ε-MSE on held-out latents at fixed (t, noise) draws: a noise-free curve across epochs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    abar = _alpha_bar("cpu")[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise  # (N, c, h, w)
    total = 0.0
    for i in range(0, len(latents), bs):
        pred = dit(x_t[i:i + bs].to(device), timestep=t[i:i + bs].to(device),
                   class_labels=labels[i:i + bs].to(device)).sample.float().cpu()
        total += F.mse_loss(pred, noise[i:i + bs], reduction="sum").item()
    return total / noise.numel()


@torch.no_grad()
def sample_latents(dit, labels: Tensor, num_classes: int, device, cfg_scale: float, steps: int = 25,
                   seed: int = 1000) -> Tensor:
    """Plain class-conditional samples (B, c, h, w) through mgd3.core.sampling (DDPM, fixed variance)."""
    from mgd3.core.sampling import CFGDenoiser, ModelOutput, Plan, randn_per_item, sample

    plan = Plan.from_betas(np.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=np.float64), steps)
    c, size = dit.config.in_channels, dit.config.sample_size

    def model(x_t, t, y):
        return ModelOutput(dit(x_t, timestep=t, class_labels=y).sample.float())

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    den = CFGDenoiser(model, cfg_scale, torch.tensor([num_classes], device=device))
    return sample(den, randn_per_item(gens, (c, size, size), device), plan, labels.to(device), gens)


@torch.no_grad()
def sample_grid(dit, vae, scaling_factor: float, num_classes: int, path: Path, device, cfg_scale: float) -> None:
    """A few plain samples per class (one row per class, at most 64 classes) -> PNG."""
    from mgd3.io.store import to_pixels, write_grid

    shown = min(num_classes, 64)
    per_class = max(1, min(4, 64 // shown))
    labels = torch.arange(shown).repeat_interleave(per_class)
    z = sample_latents(dit, labels, num_classes, device, cfg_scale)
    imgs = to_pixels(vae.decode(z / scaling_factor).sample.clamp(-1, 1))
    write_grid(path, [imgs[i * per_class:(i + 1) * per_class] for i in range(shown)])


def train_dit(cfg: PretrainConfig, latents: Tensor, labels: Tensor, num_classes: int, ckpt: Checkpoints,
              device, stats: dict, *, vae, scaling_factor: float, out: Path, val=None):
    """DiT on scaled latents (N, c, h, w); returns the EMA model (eval, frozen).

    val: optional (latents, labels) held out for `eval_loss` after each epoch.
    """
    name = "UNet" if cfg.arch == "unet" else "DiT"  # for the progress bar and the log
    dit, ema, opt, gen, start, step = _start_dit(cfg, latents.shape[-1], num_classes, ckpt, device, stats)
    abar = _alpha_bar(device)  # (T,)
    deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else None
    per_epoch = min(math.ceil(len(latents) / cfg.batch_size), cfg.max_steps or 10**12)
    # with --train-steps the epochs left follow from the steps left (a continued run may have ended mid-epoch)
    epochs = start + math.ceil(max(cfg.train_steps - step, 0) / per_epoch) if cfg.train_steps else cfg.epochs
    for epoch in range(start, epochs):
        t0, c0, losses = time.perf_counter(), time.process_time(), []
        dit.train()
        batches = epoch_batches(len(latents), cfg.batch_size, gen, cfg.max_steps)
        if cfg.train_steps:
            batches = batches[:cfg.train_steps - step]  # the last epoch may be partial
        bar = tqdm(batches, desc=f"{name} {epoch + 1}/{epochs}", disable=not cfg.progress, leave=False)
        for idx in bar:
            x0, y = latents[idx].to(device), labels[idx].to(device)  # (B, c, h, w), (B,)
            loss = _dit_step(cfg, dit, opt, gen, abar, x0, y, num_classes, device)
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up: short runs get a useful EMA
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), dit.parameters()):
                    pe.lerp_(p, 1 - decay)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if deadline and time.perf_counter() > deadline:
                stats["dit_stopped_by_time_at_epoch"] = epoch + 1
                break
        bar.close()
        stats.setdefault("dit_epoch_s", []).append(round(time.perf_counter() - t0, 2))
        stats.setdefault("dit_epoch_cpu_s", []).append(round(time.process_time() - c0, 2))  # all threads
        stats.setdefault("dit_loss", []).append(float(np.mean(losses)))
        stats.setdefault("dit_steps", []).append(step)
        if val is not None:
            stats.setdefault("dit_val_loss", []).append(round(eval_loss(ema, *val, device), 5))
        sample_grid(ema, vae, scaling_factor, num_classes, out / "samples" / f"epoch_{epoch + 1:03d}.png", device,
                    cfg.cfg)
        ckpt.save("dit", {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                          "gen": gen.get_state(), "epoch": epoch + 1, "step": step, "stats": stats},
                  {"epoch": epoch + 1, "step": step, "signature": signature(cfg, DIT_KEYS)})
        val_txt = f", val loss {stats['dit_val_loss'][-1]:.4f}" if val is not None else ""
        log.info("%s epoch %d/%d: loss %.4f%s (%.0f s)", name, epoch + 1, epochs, stats["dit_loss"][-1], val_txt,
                 stats["dit_epoch_s"][-1])
        if deadline and time.perf_counter() > deadline:
            log.info("%s: --max-minutes %.1f reached after epoch %d", name, cfg.max_minutes, epoch + 1)
            break
    return ema


def _start_dit(cfg: PretrainConfig, latent_size: int, num_classes: int, ckpt: Checkpoints, device, stats: dict):
    """The denoiser, its EMA, the optimiser and the batch generator, fresh (or the DiT of --init) or
    restored from the DiT checkpoint; returns them with the epochs and steps done."""
    torch.manual_seed(cfg.seed + 1)
    dit = build_dit(cfg, latent_size, num_classes).to(device)
    state = ckpt.load("dit")
    if cfg.init and not state:
        init_from(dit, cfg.init)
        stats["dit_init"] = str(cfg.init)
        log.info("DiT: starting from the transformer of %s", cfg.init)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start, step = 0, 0
    if state:
        with restoring(ckpt, "dit"):
            dit.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start, step = int(state["epoch"]), int(state["step"])
        stats.update(state["stats"])
        log.info("DiT: continuing after epoch %d (step %d)", start, step)
    for group in opt.param_groups:
        group["lr"] = cfg.lr  # a continued run may change it
    return dit, ema, opt, gen, start, step


def _dit_step(cfg: PretrainConfig, dit, opt, gen: torch.Generator, abar: Tensor, x0: Tensor, y: Tensor,
              num_classes: int, device) -> Tensor:
    """One optimiser step of ε-prediction on clean latents x0 (B, c, h, w) of classes y (B,), with
    label dropout to the null class; draws t, the noise and the drops from gen, in that order.
    Returns the loss."""
    b = len(x0)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    drop = torch.rand(b, generator=gen).to(device) < cfg.label_dropout
    y = torch.where(drop, torch.full_like(y, num_classes), y)  # the null class, for CFG
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, c, h, w)
    with autocast(device, cfg.bf16):
        pred = dit(x_t, timestep=t, class_labels=y).sample
    loss = F.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    opt.step()
    return loss


def init_dir(model: str | Path) -> Path:
    """The transformer/ folder of `model` (a pipeline folder or the folder itself), for --init."""
    p = Path(model).expanduser()
    d = p / "transformer" if (p / "transformer").is_dir() else p
    if not (d / "config.json").is_file():
        raise Mgd3Error(f"--init {model}: no transformer/config.json there (expected a pipeline folder of a "
                        "DiT, e.g. one mgd3 pretrain wrote, or its transformer/)")
    return d


def _own_class_rows(table, own):
    """A class table stored in diffusers' DiTPipeline layout (1001 rows, the null class at 1000;
    `null_class_at_1000`) as this DiT's (n + 1, hidden): rows 0..n-1, then the null class."""
    from mgd3.backends.dit import DIFFUSERS_NULL

    n = own.shape[0] - 1
    if table.shape[0] == DIFFUSERS_NULL + 1 and n < DIFFUSERS_NULL and table.shape[1:] == own.shape[1:]:
        return torch.cat([table[:n], table[DIFFUSERS_NULL:]])  # (n + 1, hidden)
    return table


def init_from(dit, model: str | Path) -> None:
    """Copy the weights of `model`'s DiT transformer into `dit` (same architecture required: the
    size preset, patch size, latent channels and class count must match)."""
    from diffusers import DiTTransformer2DModel

    from mgd3.backends.dit import CLASS_TABLE

    d = init_dir(model)
    try:
        src = DiTTransformer2DModel.from_pretrained(d, low_cpu_mem_usage=False).state_dict()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"--init {model}: could not load the DiT in {d} ({first})") from None
    own = dit.state_dict()
    src = {k: _own_class_rows(v, own[k]) if k.endswith(CLASS_TABLE) and k in own else v for k, v in src.items()}
    for key, value in own.items():
        if key not in src or src[key].shape != value.shape:
            got = "missing" if key not in src else f"{tuple(src[key].shape)}"
            raise Mgd3Error(f"--init {model}: its DiT does not fit this configuration ({key}: {got} there, "
                            f"{tuple(value.shape)} here); give the --size, --patch-size, data and VAE it was "
                            "trained with")
    extra = sorted(set(src) - set(own))
    if extra:
        raise Mgd3Error(f"--init {model}: its DiT has weights this configuration lacks ({extra[0]}); give the "
                        "--size it was trained with")
    dit.load_state_dict({k: src[k].to(own[k].dtype) for k in own})


def calibrate(cfg: PretrainConfig, latent_size: int, num_classes: int, steps: int = 3) -> float:
    """CPU seconds (all threads) per DiT optimiser step of this config, on random latents:
    for turning a CPU budget into --train-steps."""
    device = torch_device(cfg.device)
    dit = build_dit(cfg, latent_size, num_classes).to(device)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.batch_size, cfg.latent_channels, latent_size, latent_size), generator=g).to(device)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=g).to(device)
    y = torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(device)

    def one():
        with autocast(device, cfg.bf16):
            loss = F.mse_loss(dit(x, timestep=t, class_labels=y).sample.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()  # warm-up
    c0 = time.process_time()
    for _ in range(steps):
        one()
    return (time.process_time() - c0) / steps
