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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mgd3.config import FINITE_NON_NEGATIVE, POSITIVE, RANDOM_STATE_MAX, Rule, check_device, check_rules, check_types, convert, fill, resolve_device
from mgd3.errors import Mgd3Error
from mgd3.files import to_uint8, write_atomic
from mgd3.machine import cpu_name

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- models


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(resolve_device(name))
    try:
        return torch.device(name)
    except RuntimeError:
        raise Mgd3Error(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto") from None


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def dit_size(cfg: PretrainConfig) -> dict[str, int]:
    if cfg.size not in SIZES:
        raise Mgd3Error(f"unknown --size {cfg.size!r}; known: {', '.join(SIZES)}")
    size = dict(SIZES[cfg.size])
    if cfg.patch_size is not None:
        size["patch_size"] = cfg.patch_size
    return size


def build_vae(cfg: PretrainConfig, channels: int, resolution: int):
    """AutoencoderKL with `vae_levels` levels of widths (w, 2w, 2w, ...), one resnet per level."""
    from diffusers import AutoencoderKL

    down = 2 ** (cfg.vae_levels - 1)
    if resolution % down:
        raise Mgd3Error(f"resolution {resolution} is not divisible by the VAE's downsampling {down} "
                        f"(--vae-levels {cfg.vae_levels}); pass --resolution or --vae-levels")
    widths = tuple(cfg.vae_width * min(2**i, 2) for i in range(cfg.vae_levels))
    vae = AutoencoderKL(in_channels=channels, out_channels=channels,
                        down_block_types=("DownEncoderBlock2D",) * cfg.vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * cfg.vae_levels,
                        block_out_channels=widths, layers_per_block=1, latent_channels=cfg.latent_channels,
                        norm_num_groups=math.gcd(32, cfg.vae_width), sample_size=resolution)
    with torch.no_grad():
        # posterior log-variance starts near -6 (std 0.05), not 0: at std 1 the decoder would
        # first see latents that are mostly noise, which slows the start of training
        vae.quant_conv.bias[cfg.latent_channels:] -= 6.0
    return vae


def build_dit(cfg: PretrainConfig, latent_size: int, num_classes: int):
    """DiTTransformer2DModel, ε-prediction with fixed variance (out channels = in channels).
    --arch unet: the class-conditional latent UNet instead (mgd3.backends.unet.build_unet)."""
    from diffusers import DiTTransformer2DModel

    if cfg.arch == "unet":
        from mgd3.backends.unet import build_unet

        return build_unet(cfg.latent_channels, latent_size, num_classes, cfg.size)

    size = dit_size(cfg)
    if latent_size % size["patch_size"]:
        raise Mgd3Error(f"latent size {latent_size} is not divisible by the patch size {size['patch_size']}")
    m = DiTTransformer2DModel(in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                              sample_size=latent_size, num_embeds_ada_norm=num_classes, **size)
    dit_init(m)
    for mod in m.modules():
        if mod.__class__.__name__ == "LabelEmbedding":
            # Each diffusers DiT block has its own label embedder with dropout 0.1 in train mode:
            # independent drops per block would train a mix of conditions that sampling never
            # uses. The trainer drops labels once per image instead; the null row stays.
            mod.dropout_prob = 0.0
    return m


@torch.no_grad()
def dit_init(m) -> None:
    """The DiT paper's initialisation (facebookresearch/DiT `initialize_weights`), which diffusers
    does not apply: xavier linears, N(0, 0.02) label/timestep embedders, and adaLN-Zero — every
    block's modulation and the output layer start at zero, so each block starts as the identity."""
    from torch import nn

    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif mod.__class__.__name__ == "LabelEmbedding":
            nn.init.normal_(mod.embedding_table.weight, std=0.02)
    proj = m.pos_embed.proj  # the patch embedding, a conv: xavier as if it were a linear
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for mod in m.modules():
        if mod.__class__.__name__ == "TimestepEmbedding":
            nn.init.normal_(mod.linear_1.weight, std=0.02)
            nn.init.normal_(mod.linear_2.weight, std=0.02)
    for block in m.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (m.proj_out_1, m.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------- data


def _to_float(x: Tensor, device) -> Tensor:
    return x.to(device).float() / 127.5 - 1.0  # (B, C, R, R) in [-1, 1]


def _load_split(cfg: PretrainConfig, split: str, limit: int | None = None):
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


# --------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    """OUT/.checkpoints/{vae,dit}.pt (states) + {vae,dit}.json (epoch, config signature)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def meta(self, stage: str) -> dict | None:
        f = self.folder / f"{stage}.json"
        if not (f.is_file() and (self.folder / f"{stage}.pt").is_file()):
            return None
        try:
            meta = json.loads(f.read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("signature"), dict) \
                or not isinstance(meta.get("epoch"), int):
            raise Mgd3Error(f"checkpoint {f} is unreadable; delete {self.folder} (or use --overwrite) to start "
                            "that stage afresh")
        return meta

    def load(self, stage: str) -> dict | None:
        """A checkpoint: plain tensors, numbers and lists only (weights_only=True, so a planted pickle
        cannot run); a truncated or foreign file is one error line."""
        if self.meta(stage) is None:
            return None
        f = self.folder / f"{stage}.pt"
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"model", "opt", "gen", "epoch", "step", "stats"} <= set(state):
                raise ValueError("not an mgd3 pretrain checkpoint")
        except Exception as e:  # noqa: BLE001  (truncated, garbage, or a pickle that is not plain data)
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise Mgd3Error(f"checkpoint {f} is unreadable ({first}); delete {self.folder} (or use --overwrite) to "
                            "start that stage afresh") from None
        return state

    def add_run(self, run: dict) -> list[dict]:
        f = self.folder / "runs.json"
        try:
            runs = json.loads(f.read_text()) if f.is_file() else []
        except (OSError, ValueError):
            runs = []
        runs = (runs if isinstance(runs, list) else []) + [run]
        self.folder.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(runs, indent=2))
        return runs

    def save(self, stage: str, state: dict, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, write in ((f"{stage}.pt", lambda p: torch.save(state, p)),
                            (f"{stage}.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))):
            write_atomic(self.folder / name, write)


@contextlib.contextmanager
def _restoring(ckpt: _Checkpoints, stage: str):
    """A checkpoint that loads but does not fit the model is one error line."""
    try:
        yield
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"checkpoint {ckpt.folder / (stage + '.pt')} does not fit this model ({first}); delete "
                        f"{ckpt.folder} (or use --overwrite) to start afresh") from None


def _signature(cfg: PretrainConfig, keys: tuple[str, ...]) -> dict:
    return {k: getattr(cfg, k) for k in keys}


def _check_signature(meta: dict | None, cfg: PretrainConfig, keys: tuple[str, ...], out: Path) -> None:
    if meta is None:
        return
    want = json.loads(json.dumps(_signature(cfg, keys), default=str))
    diff = [k for k in keys if meta["signature"].get(k) != want[k]]
    if diff:
        was = ", ".join(f"{k}={meta['signature'].get(k)!r} (now {want[k]!r})" for k in diff)
        raise Mgd3Error(f"{out} holds checkpoints of another configuration ({was}); "
                        "use the same options, another --out, or --overwrite")


def _written_by_pretrain(out: Path) -> bool:
    try:
        info = json.loads((out / "mgd3.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("trained_by") == "mgd3 pretrain"


def _prepare_out(cfg: PretrainConfig) -> tuple[Path, _Checkpoints]:
    """Create OUT, clear it (--overwrite), or decide to continue from its checkpoints."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"output {out} exists and is not a folder")
    ckpt = _Checkpoints(out / ".checkpoints")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if foreign and not ((out / "model_index.json").exists() or (out / ".checkpoints").exists()):
            raise Mgd3Error(f"output folder {out} is not empty and holds no mgd3 pretrain run "
                            f"(found {', '.join(foreign[:3])})")
        if cfg.overwrite and (out / "model_index.json").exists() and not (out / ".checkpoints").exists() \
                and not _written_by_pretrain(out):
            raise Mgd3Error(f"--overwrite: {out} holds a model mgd3 pretrain did not write (no .checkpoints, no "
                            "mgd3.json of mgd3 pretrain); mgd3 deletes only what it wrote; choose another --out")
        if cfg.overwrite:
            for name in OUTPUTS:  # model_index.json first: a crash mid-clean never leaves a 'finished' folder
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    vae_meta, dit_meta = ckpt.meta("vae"), ckpt.meta("dit")
    _check_signature(vae_meta, cfg, VAE_KEYS, out)
    if dit_meta is not None:
        _check_signature(dit_meta, cfg, DIT_KEYS, out)
    if (out / "model_index.json").exists():
        if dit_meta is None or (dit_meta.get("step", 0) >= cfg.train_steps if cfg.train_steps
                                else dit_meta["epoch"] >= cfg.epochs):
            done = f" ({dit_meta['epoch']} DiT epochs, {dit_meta.get('step')} steps)" if dit_meta else ""
            raise Mgd3Error(f"{out} already holds a finished model{done}; use --overwrite to train again, "
                            "or a larger --epochs / --train-steps to continue its training")
        log.info("continuing the finished model in %s after DiT epoch %d", out, dit_meta["epoch"])
        (out / "model_index.json").unlink()  # the folder is unfinished again until the new save
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Mgd3Error(f"cannot create output folder {out} ({e.strerror or e})") from None
    return out, ckpt


# --------------------------------------------------------------------------- stage 1: VAE


def _batches(n: int, bs: int, gen: torch.Generator, max_steps: int | None) -> list[Tensor]:
    perm = torch.randperm(n, generator=gen)
    out = [perm[i:i + bs] for i in range(0, n, bs)]
    return out[:max_steps] if max_steps else out


def _continue(ckpt: _Checkpoints, stage: str, model, opt, gen: torch.Generator, stats: dict) -> tuple[int, int]:
    """Restore a VAE stage's checkpoint (model, optimiser, generator, stats) if there is one;
    returns (epochs done, steps done)."""
    state = ckpt.load(stage)
    if not state:
        return 0, 0
    with _restoring(ckpt, stage):
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


def train_vae(cfg: PretrainConfig, images: Tensor, ckpt: _Checkpoints, device, stats: dict):
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
        bar = tqdm(_batches(len(images), bs, gen, cfg.max_steps), desc=f"VAE {epoch + 1}/{cfg.vae_epochs}",
                   disable=not cfg.progress, leave=False)
        for idx in bar:
            _set_cosine_lr(opt, cfg.vae_lr, step, total)
            x = _to_float(images[idx], device)  # (B, C, R, R)
            noise = torch.randn((len(idx), cfg.latent_channels, *_latent_hw(cfg, images)), generator=gen).to(device)
            with _autocast(device, cfg.bf16):
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
                  {"epoch": epoch + 1, "signature": _signature(cfg, VAE_KEYS)})
        log.info("VAE epoch %d/%d: loss %.4f, train PSNR %.2f dB (%.0f s)", epoch + 1, cfg.vae_epochs,
                 stats["vae_loss"][-1], stats["vae_train_psnr_db"][-1], stats["vae_epoch_s"][-1])
    return vae.eval().requires_grad_(False)


def tune_decoder(cfg: PretrainConfig, vae, images: Tensor, ckpt: _Checkpoints, device, stats: dict):
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
        bar = tqdm(_batches(len(images), bs, gen, cfg.max_steps),
                   desc=f"VAE decoder {epoch + 1}/{cfg.vae_decoder_epochs}", disable=not cfg.progress, leave=False)
        for idx in bar:
            _set_cosine_lr(opt, cfg.vae_lr, step, total)
            x = _to_float(images[idx], device)  # (B, C, R, R)
            with torch.no_grad(), _autocast(device, cfg.bf16):
                post = vae.encode(x).latent_dist
                z = post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=gen).to(device)
            with _autocast(device, cfg.bf16):
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
                  {"epoch": epoch + 1, "signature": _signature(cfg, VAE_KEYS)})
        log.info("VAE decoder epoch %d/%d: %s loss %.4f (%.0f s)", epoch + 1, cfg.vae_decoder_epochs, cfg.vae_loss,
                 stats["decoder_loss"][-1], stats["decoder_epoch_s"][-1])
    return vae.eval().requires_grad_(False)


def _latent_hw(cfg: PretrainConfig, images: Tensor) -> tuple[int, int]:
    s = images.shape[-1] // 2 ** (cfg.vae_levels - 1)
    return s, s


@torch.no_grad()
def encode_all(vae, images: Tensor, device, bs: int = 500) -> Tensor:
    """Posterior means (N, c, h, w) of uint8 images (N, C, R, R), unscaled, float32 on the CPU."""
    return torch.cat([vae.encode(_to_float(images[i:i + bs], device)).latent_dist.mean.float().cpu()
                      for i in range(0, len(images), bs)])


@torch.no_grad()
def reconstruction_psnr(vae, images: Tensor, device, bs: int = 500) -> float:
    """PSNR (dB, peak-to-peak 2) of decode(encode mean) over uint8 images (N, C, R, R)."""
    from mgd3.train.quality import psnr

    rec = torch.cat([vae.decode(vae.encode(_to_float(images[i:i + bs], device)).latent_dist.mean).sample
                     .clamp(-1, 1).float().cpu() for i in range(0, len(images), bs)])
    return psnr(rec, _to_float(images, "cpu"))


# --------------------------------------------------------------------------- stage 4: DiT


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


def train_dit(cfg: PretrainConfig, latents: Tensor, labels: Tensor, num_classes: int, ckpt: _Checkpoints,
              device, stats: dict, *, vae, scaling_factor: float, out: Path, val=None):
    """DiT on scaled latents (N, c, h, w); returns the EMA model (eval, frozen).

    val: optional (latents, labels) held out for `eval_loss` after each epoch.
    """
    torch.manual_seed(cfg.seed + 1)
    name = "UNet" if cfg.arch == "unet" else "DiT"  # for the progress bar and the log
    dit = build_dit(cfg, latents.shape[-1], num_classes).to(device)
    state = ckpt.load("dit")
    if cfg.init and not state:
        init_from(dit, cfg.init)
        stats["dit_init"] = str(cfg.init)
        log.info("DiT: starting from the transformer of %s", cfg.init)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar = _alpha_bar(device)  # (T,)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start, step = 0, 0
    if state:
        with _restoring(ckpt, "dit"):
            dit.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start, step = int(state["epoch"]), int(state["step"])
        stats.update(state["stats"])
        log.info("DiT: continuing after epoch %d (step %d)", start, step)
    for group in opt.param_groups:
        group["lr"] = cfg.lr  # a continued run may change it
    deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else None
    per_epoch = min(math.ceil(len(latents) / cfg.batch_size), cfg.max_steps or 10**12)
    # with --train-steps the epochs left follow from the steps left (a continued run may have ended mid-epoch)
    epochs = start + math.ceil(max(cfg.train_steps - step, 0) / per_epoch) if cfg.train_steps else cfg.epochs
    for epoch in range(start, epochs):
        t0, c0, losses = time.perf_counter(), time.process_time(), []
        dit.train()
        batches = _batches(len(latents), cfg.batch_size, gen, cfg.max_steps)
        if cfg.train_steps:
            batches = batches[:cfg.train_steps - step]  # the last epoch may be partial
        bar = tqdm(batches, desc=f"{name} {epoch + 1}/{epochs}", disable=not cfg.progress, leave=False)
        for idx in bar:
            x0, y = latents[idx].to(device), labels[idx].to(device)  # (B, c, h, w), (B,)
            b = len(idx)
            t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            drop = torch.rand(b, generator=gen).to(device) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, num_classes), y)  # the null class, for CFG
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, c, h, w)
            with _autocast(device, cfg.bf16):
                pred = dit(x_t, timestep=t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            opt.step()
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
                  {"epoch": epoch + 1, "step": step, "signature": _signature(cfg, DIT_KEYS)})
        val_txt = f", val loss {stats['dit_val_loss'][-1]:.4f}" if val is not None else ""
        log.info("%s epoch %d/%d: loss %.4f%s (%.0f s)", name, epoch + 1, epochs, stats["dit_loss"][-1], val_txt,
                 stats["dit_epoch_s"][-1])
        if deadline and time.perf_counter() > deadline:
            log.info("%s: --max-minutes %.1f reached after epoch %d", name, cfg.max_minutes, epoch + 1)
            break
    return ema


def _init_dir(model: str | Path) -> Path:
    """The transformer/ folder of `model` (a pipeline folder or the folder itself), for --init."""
    p = Path(model).expanduser()
    d = p / "transformer" if (p / "transformer").is_dir() else p
    if not (d / "config.json").is_file():
        raise Mgd3Error(f"--init {model}: no transformer/config.json there (expected a pipeline folder of a "
                        "DiT, e.g. one mgd3 pretrain wrote, or its transformer/)")
    return d


def init_from(dit, model: str | Path) -> None:
    """Copy the weights of `model`'s DiT transformer into `dit` (same architecture required: the
    size preset, patch size, latent channels and class count must match)."""
    from diffusers import DiTTransformer2DModel

    d = _init_dir(model)
    try:
        src = DiTTransformer2DModel.from_pretrained(d, low_cpu_mem_usage=False).state_dict()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"--init {model}: could not load the DiT in {d} ({first})") from None
    own = dit.state_dict()
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
    device = _device(cfg.device)
    dit = build_dit(cfg, latent_size, num_classes).to(device)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.batch_size, cfg.latent_channels, latent_size, latent_size), generator=g).to(device)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=g).to(device)
    y = torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(device)

    def one():
        with _autocast(device, cfg.bf16):
            loss = F.mse_loss(dit(x, timestep=t, class_labels=y).sample.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()  # warm-up
    c0 = time.process_time()
    for _ in range(steps):
        one()
    return (time.process_time() - c0) / steps


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
        _init_dir(cfg.init)


def pretrain(cfg: PretrainConfig) -> Path:
    """Train (or continue training) and write the pipeline folder; returns it."""
    from diffusers import DDIMScheduler, DiTPipeline

    _validate(cfg)
    if cfg.vae:  # the reused VAE fixes the latent space
        from mgd3.backends.unet import reused_vae_settings

        cfg.latent_channels, cfg.vae_levels, cfg.vae_width = reused_vae_settings(cfg.vae)
    device = _device(cfg.device)
    t_all = time.perf_counter()
    data, images, targets = _load_split(cfg, "train", cfg.limit)  # before touching OUT: bad data fails first
    down = 2 ** (cfg.vae_levels - 1)
    if data.resolution % down or (data.resolution // down) % dit_size(cfg)["patch_size"]:
        raise Mgd3Error(f"resolution {data.resolution} is not divisible by the VAE's downsampling {down} "
                        f"(--vae-levels {cfg.vae_levels}) times the patch size; pass --resolution or --vae-levels")
    out, ckpt = _prepare_out(cfg)
    test = _load_split(cfg, "test")
    num_classes = len(data.class_ids)
    stats: dict = {}

    # 1. VAE
    if cfg.vae:
        from mgd3.backends.unet import load_reused_vae

        vae = load_reused_vae(cfg.vae, images.shape[1], images.shape[-1]).to(device)
        if cfg.vae_decoder_epochs:
            if test is not None and "vae_test_psnr_db_before" not in stats:
                stats["vae_test_psnr_db_before"] = round(reconstruction_psnr(vae, test[1], device), 2)
            vae = tune_decoder(cfg, vae, images, ckpt, device, stats)
    else:
        vae = train_vae(cfg, images, ckpt, device, stats)
    # 2.-3. scaling factor and the encoded train set
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
    scheduler = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                              beta_schedule="linear", clip_sample=False)
    id2label = {str(i): n for i, n in enumerate(data.class_names)}
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
    info = {
        "defaults": {"cfg": cfg.cfg},
        "trained_by": "mgd3 pretrain",
        "data": {"name": cfg.data, "classes": data.class_ids, "class_names": data.class_names,
                 "resolution": data.resolution, "channels": data.channels, "train_images": len(images),
                 "fingerprint": data.fingerprint()},
        "config": dataclasses.asdict(cfg),
        "stats": stats,
        "transformer_params": sum(p.numel() for p in ema.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scaling_factor,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                    "threads": torch.get_num_threads()},
    }
    (out / "mgd3.json").write_text(json.dumps(info, indent=2, default=str))
    write_model_card(out, cfg, data, stats, info["transformer_params"], device)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))  # last: the folder is complete
    log.info("wrote %s (%.0f s)", out, time.perf_counter() - t_all)
    if cfg.quality:
        add_quality(out, cfg, device)
    return out


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


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_model_card(out: Path, cfg: PretrainConfig, data, stats: dict, n_params: int, device,
                     quality: dict | None = None) -> None:
    """MODEL_CARD.md: data, command, epochs, wall time per stage, losses, PSNR, quality numbers."""
    size = dit_size(cfg)
    down = 2 ** (cfg.vae_levels - 1)
    lat = f"{cfg.latent_channels}x{data.resolution // down}x{data.resolution // down}"
    last = lambda key: (stats.get(key) or [None])[-1]  # noqa: E731
    vae_s, dit_s = sum(stats.get("vae_epoch_s", [])), sum(stats.get("dit_epoch_s", []))
    dit_epochs = len(stats.get("dit_loss", []))
    runs = stats.get("runs", [])
    lines = [
        f"# mgd3 latent DiT for {cfg.data}",
        "",
        "A class-conditional latent diffusion model trained " + ("further (`--init`)" if stats.get("dit_init") else
                                                                 "from scratch") + " by `mgd3 pretrain`, saved in the",
        "diffusers DiT pipeline layout (`model_index.json`, `transformer/`, `vae/`, `scheduler/`), so",
        f"`mgd3 distill --model {out.name}` loads it like `facebook/DiT-XL-2-256`.",
        "",
        "## Training",
        "",
        f"- Data: `{cfg.data}`, {len(data.class_ids)} classes ({', '.join(data.class_names)}), "
        f"{data.resolution}x{data.resolution}x{data.channels}, "
        f"{cfg.limit if cfg.limit else len(data)} train images",
        "- Command" + ("s" if len(runs) > 1 else "") + ": " + "; ".join(f"`{r['command'] or 'pretrain(cfg)'}`"
                                                                        for r in runs),
        f"- Device: {device} ({cpu_name()}, {torch.get_num_threads()} thread(s)); "
        f"torch {torch.__version__}; bf16 autocast: {cfg.bf16}",
        f"- VAE: AutoencoderKL, {cfg.vae_levels} levels, width {cfg.vae_width}, latent {lat}, "
        f"{len(stats.get('vae_loss', []))} epochs ({cfg.vae_loss} + {cfg.kl_weight:g} KL, lr {cfg.vae_lr:g} cosine), "
        f"final loss {_fmt(last('vae_loss'))}, {vae_s / 60:.1f} min",
        f"- Latent scaling factor: 1 / std of the train latents' means (encode: {stats.get('encode_s', 0):.0f} s)",
        f"- DiT: size `{cfg.size}` ({n_params / 1e6:.2f} M params; {size['num_layers']} layers, "
        f"{size['num_attention_heads']} heads x {size['attention_head_dim']}, patch {size['patch_size']}), "
        f"eps-prediction, fixed variance, linear betas {BETA_START:g}..{BETA_END:g} x {NUM_TRAIN_TIMESTEPS}",
        (f"- DiT training: {dit_epochs} epochs ({(stats.get('dit_steps') or [0])[-1]} steps), batch {cfg.batch_size}, "
         f"AdamW lr {cfg.lr:g}, EMA {cfg.ema_decay} (weights shipped), label dropout {cfg.label_dropout}, "
         f"{dit_s / 60:.1f} min ({dit_s / max(dit_epochs, 1) / 60:.2f} min/epoch)") if dit_epochs else
        "- DiT training: none here (--epochs 0)",
        *([f"- DiT initialised from `{stats['dit_init']}` (`--init`: its transformer's weights, a fresh optimiser); "
           "the epochs and steps above are counted from there"
           + ("; with --epochs 0 its weights are kept as they are" if not dit_epochs else "")]
          if stats.get("dit_init") else []),
        f"- Final DiT loss: train {_fmt(last('dit_loss'))}, held-out test latents (EMA) {_fmt(last('dit_val_loss'))}",
        f"- Wall time of the command(s) above: {sum(r['seconds'] for r in runs) / 60:.1f} min (an invocation "
        "stopped before writing the folder is not listed; its epochs count in the training time above)",
        f"- VAE reconstruction PSNR on the test split: {_fmt(stats.get('vae_test_psnr_db'), '.2f')} dB"
        + (f" ({stats['vae_test_psnr_db_before']:.2f} dB before its decoder was trained here; decoder: "
           f"{len(stats.get('decoder_loss', []))} epochs, final loss {_fmt(last('decoder_loss'))}, "
           f"{sum(stats.get('decoder_epoch_s', [])) / 60:.1f} min)" if "vae_test_psnr_db_before" in stats else ""),
        f"- Recommended sampling (`mgd3.json`): CFG {cfg.cfg}",
    ]
    if cfg.arch == "unet" or cfg.vae:
        from mgd3.backends.unet import card_lines

        lines = card_lines(lines, cfg, n_params)
    if quality:
        lines += ["", "## Quality (measured by mgd3's own code, `mgd3.train.quality`)", ""]
        lines += [f"- {k}: {v}" for k, v in quality.items()]
    lines += ["", "Per-epoch sample grids are in `samples/` (training output, not part of the model)."]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CLI


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
    quiet = convert("quiet", values.pop("quiet", False), "bool", source)
    top = fill(PretrainConfig, values, source, skip=("progress", "command"))
    for req in ("data", "out"):
        if req not in top:
            raise Mgd3Error(f"--{req} is required")
    cfg = PretrainConfig(**top, progress=not quiet, command=command)
    validate_pretrain(cfg)
    return cfg


def validate_pretrain(cfg) -> None:
    check_types(cfg)
    check_rules(cfg, PRETRAIN_RULES)
    check_device(cfg.device)


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
    from mgd3.config import suppress_defaults

    suppress_defaults(p)
    p.set_defaults(func=run)


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
