"""`mgd3 pretrain`: train a VAE and a class-conditional latent DiT on a dataset and write a
diffusers DiT pipeline folder that `mgd3.backends` loads exactly like `facebook/DiT-XL-2-256`.

Stages: (1) AutoencoderKL (L2 reconstruction + a small KL term); (2) latent scaling factor =
1 / std of the train latents' means, stored in the VAE config; (3) the train set encoded once;
(4) DiTTransformer2DModel (ada-norm-zero, ε-prediction, fixed variance) on the latents with the
linear 1e-4..0.02 schedule, label dropout to the null class done here (the per-block label
embedders' own dropout is switched off), EMA weights; (5) save: transformer (EMA), vae,
scheduler, mgd3.json (recommended sampling settings), MODEL_CARD.md, model_index.json last.

Checkpoints after every epoch in OUT/.checkpoints make a re-run of the same command continue.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mgd3.errors import Mgd3Error
from mgd3.quality import psnr

log = logging.getLogger(__name__)

# DiT sizes: layers, heads, head dim, patch
SIZES: dict[str, dict] = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, patch_size=1),
    "small": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=1),
    "medium": dict(num_layers=6, num_attention_heads=6, attention_head_dim=32, patch_size=1),
    "base": dict(num_layers=8, num_attention_heads=8, attention_head_dim=32, patch_size=1),
}


@dataclass
class PretrainConfig:
    data: str
    out: str
    classes: list[str] | None = None
    data_root: str | None = None
    resolution: int | None = None  # None: the data's native size
    channels: int | None = None
    size: str = "small"
    latent_channels: int = 4
    vae_levels: int = 3  # 2 downsamplings: 28x28 -> 7x7
    vae_width: int = 32
    vae_epochs: int = 5
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    epochs: int = 20
    batch_size: int = 256
    lr: float = 3e-4
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    cfg: float = 2.0  # recommended CFG written to mgd3.json
    bf16: bool = False
    seed: int = 0
    device: str = "auto"
    limit: int | None = None  # use only the first N train images (smoke tests)
    max_steps: int | None = None  # stop each stage after N optimiser steps (smoke tests)
    overwrite: bool = False
    progress: bool = True
    command: str = ""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _load_images(cfg: PretrainConfig, split: str):
    from mgd3.data import load_data

    data = load_data(cfg.data, split, resolution=cfg.resolution, channels=cfg.channels, classes=cfg.classes,
                     data_root=cfg.data_root)
    idx = np.arange(len(data))
    if cfg.limit and split == "train":
        idx = np.random.default_rng(cfg.seed).permutation(len(data))[: cfg.limit]
    loader = torch.utils.data.DataLoader(data.dataset(idx), batch_size=512, num_workers=0)
    xs, ys = zip(*[(x, y) for x, y in loader])
    return data, torch.cat(xs), torch.cat(ys)  # (N, C, R, R) in [-1, 1], (N,)


def build_vae(cfg: PretrainConfig, channels: int, resolution: int):
    from diffusers import AutoencoderKL

    down = 2 ** (cfg.vae_levels - 1)
    if resolution % down:
        raise Mgd3Error(f"resolution {resolution} is not divisible by the VAE's downsampling {down}")
    widths = tuple(cfg.vae_width * min(2**i, 2) for i in range(cfg.vae_levels))
    return AutoencoderKL(in_channels=channels, out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * cfg.vae_levels,
                         up_block_types=("UpDecoderBlock2D",) * cfg.vae_levels,
                         block_out_channels=widths, layers_per_block=1, latent_channels=cfg.latent_channels,
                         norm_num_groups=min(32, cfg.vae_width), sample_size=resolution)


def build_dit(cfg: PretrainConfig, latent_size: int, num_classes: int):
    from diffusers import DiTTransformer2DModel

    if cfg.size not in SIZES:
        raise Mgd3Error(f"unknown --size {cfg.size!r}; known: {', '.join(SIZES)}")
    m = DiTTransformer2DModel(in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                              sample_size=latent_size, num_embeds_ada_norm=num_classes, **SIZES[cfg.size])
    for mod in m.modules():
        if mod.__class__.__name__ == "LabelEmbedding":
            mod.dropout_prob = 0.0  # the trainer drops labels itself (one decision for all blocks)
    return m


class _Checkpoint:
    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, name: str):
        f = self.folder / f"{name}.pt"
        return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None

    def save(self, name: str, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        torch.save(state, tmp)
        tmp.replace(self.folder / f"{name}.pt")


def _batches(n: int, bs: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + bs] for i in range(0, n, bs)]


def train_vae(cfg, images, ckpt: _Checkpoint, device, stats: dict):
    vae = build_vae(cfg, images.shape[1], images.shape[-1]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    start, gen = 0, torch.Generator().manual_seed(cfg.seed)
    state = ckpt.load("vae")
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"]
        gen.set_state(state["gen"])
        stats.update(state["stats"])
        log.info("VAE: resuming after epoch %d", start)
    steps = 0
    for epoch in range(start, cfg.vae_epochs):
        t0, losses = time.perf_counter(), []
        vae.train()
        bar = tqdm(_batches(len(images), cfg.batch_size, gen), desc=f"VAE {epoch + 1}/{cfg.vae_epochs}",
                   disable=not cfg.progress, leave=False)
        for idx in bar:
            x = images[idx].to(device)
            with _autocast(device, cfg.bf16):
                post = vae.encode(x).latent_dist
                z = post.mean + post.std * torch.randn_like(post.std)
                rec = vae.decode(z).sample
            loss = F.mse_loss(rec.float(), x) + cfg.kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            steps += 1
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        stats.setdefault("vae_epoch_s", []).append(time.perf_counter() - t0)
        stats.setdefault("vae_loss", []).append(float(np.mean(losses)))
        ckpt.save("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1,
                          "gen": gen.get_state(), "stats": stats})
        log.info("VAE epoch %d: loss %.4f (%.0f s)", epoch + 1, stats["vae_loss"][-1], stats["vae_epoch_s"][-1])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, device, bs=512) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + bs].to(device)).latent_dist.mean.float().cpu()
                      for i in range(0, len(images), bs)])


@torch.no_grad()
def sample_grid(dit, vae, sf, num_classes, path: Path, device, cfg_scale, per_class=4, steps=25):
    from mgd3.sampling import CFGDenoiser, ModelOutput, Plan, randn_per_item, sample
    from mgd3.store import to_uint8, write_grid

    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    plan = Plan.from_betas(betas, steps)
    c = dit.config.in_channels
    size = dit.config.sample_size

    def model(x, t, y):
        return ModelOutput(dit(x, timestep=t, class_labels=y).sample.float())

    labels = torch.arange(num_classes).repeat_interleave(per_class).to(device)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(labels))]
    den = CFGDenoiser(model, cfg_scale, torch.tensor([num_classes], device=device))
    z = sample(den, randn_per_item(gens, (c, size, size), device), plan, labels, gens)
    imgs = to_uint8(vae.decode(z / sf).sample.clamp(-1, 1))
    write_grid(path, [imgs[i * per_class:(i + 1) * per_class] for i in range(num_classes)])


def train_dit(cfg, latents, labels, num_classes, ckpt: _Checkpoint, device, stats, vae, sf, out: Path):
    dit = build_dit(cfg, latents.shape[-1], num_classes).to(device)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float().to(device)
    start, gen = 0, torch.Generator().manual_seed(cfg.seed + 1)
    state = ckpt.load("dit")
    if state:
        dit.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"]
        gen.set_state(state["gen"])
        stats.update(state["stats"])
        log.info("DiT: resuming after epoch %d", start)
    steps = 0
    for epoch in range(start, cfg.epochs):
        t0, losses = time.perf_counter(), []
        dit.train()
        bar = tqdm(_batches(len(latents), cfg.batch_size, gen), desc=f"DiT {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for idx in bar:
            x0, y = latents[idx].to(device), labels[idx].to(device)
            b = len(idx)
            t = torch.randint(0, 1000, (b,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            drop = torch.rand(b, generator=gen).to(device) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, num_classes), y)  # null class for CFG
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with _autocast(device, cfg.bf16):
                pred = dit(x_t, timestep=t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), dit.parameters()):
                    pe.lerp_(p, 1 - cfg.ema_decay)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            steps += 1
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        stats.setdefault("dit_epoch_s", []).append(time.perf_counter() - t0)
        stats.setdefault("dit_loss", []).append(float(np.mean(losses)))
        sample_grid(ema, vae, sf, num_classes, out / "samples" / f"epoch_{epoch + 1:03d}.png", device, cfg.cfg)
        ckpt.save("dit", {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                          "epoch": epoch + 1, "gen": gen.get_state(), "stats": stats})
        log.info("DiT epoch %d: loss %.4f (%.0f s)", epoch + 1, stats["dit_loss"][-1], stats["dit_epoch_s"][-1])
    return ema


def pretrain(cfg: PretrainConfig) -> Path:
    """Train and write the pipeline folder; returns it."""
    from diffusers import DDIMScheduler, DiTPipeline

    if cfg.size not in SIZES:
        raise Mgd3Error(f"unknown --size {cfg.size!r}; known: {', '.join(SIZES)}")
    if cfg.epochs < 1 or cfg.vae_epochs < 1 or cfg.batch_size < 1:
        raise Mgd3Error("--epochs, --vae-epochs and --batch-size must be at least 1")
    if not 0 <= cfg.label_dropout < 1:
        raise Mgd3Error("--label-dropout must be in [0, 1)")
    out = Path(cfg.out).expanduser()
    if (out / "model_index.json").exists():
        if not cfg.overwrite:
            raise Mgd3Error(f"{out} already holds a finished model (use --overwrite to train again)")
        shutil.rmtree(out)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_all = time.perf_counter()
    data, images, labels = _load_images(cfg, "train")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _Checkpoint(out / ".checkpoints")
    stats: dict = {}
    vae = train_vae(cfg, images, ckpt, device, stats)
    mean_latents = encode_all(vae, images, device)  # (N, c, h, w)
    sf = float(1.0 / mean_latents.std())
    vae.register_to_config(scaling_factor=sf)
    latents = mean_latents * sf
    num_classes = len(data.class_ids)
    ema = train_dit(cfg, latents, labels, num_classes, ckpt, device, stats, vae, sf, out)

    # VAE reconstruction PSNR on the test split
    try:
        _, test_images, _ = _load_images(dataclasses.replace(cfg, limit=None), "test")
        test_images = test_images[:2000]
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(test_images[i:i + 500].to(device)).latent_dist.mean).sample
                             .clamp(-1, 1).cpu() for i in range(0, len(test_images), 500)])
        stats["vae_test_psnr_db"] = psnr(rec, test_images)
    except Mgd3Error as e:
        log.warning("no test split for the PSNR: %s", e)

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False)
    id2label = {str(i): n for i, n in enumerate(data.class_names)}
    tmp = out / ".save"
    if tmp.exists():
        shutil.rmtree(tmp)
    DiTPipeline(transformer=ema.cpu(), vae=vae.cpu(), scheduler=scheduler, id2label=id2label).save_pretrained(tmp)
    for sub in ("transformer", "vae", "scheduler"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (tmp / sub).rename(out / sub)
    index = json.loads((tmp / "model_index.json").read_text())
    index["id2label"] = id2label
    shutil.rmtree(tmp)
    stats["total_s"] = time.perf_counter() - t_all
    n_params = sum(p.numel() for p in ema.parameters())
    (out / "mgd3.json").write_text(json.dumps({
        "defaults": {"cfg": cfg.cfg},
        "trained_by": "mgd3 pretrain", "data": cfg.data, "classes": data.class_ids,
        "config": dataclasses.asdict(cfg), "stats": stats, "transformer_params": n_params,
    }, indent=2, default=str))
    write_model_card(out, cfg, data, stats, n_params, device)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))  # last: the folder is complete
    return out


def write_model_card(out: Path, cfg: PretrainConfig, data, stats: dict, n_params: int, device,
                     quality: dict | None = None) -> None:
    lines = [
        f"# mgd3 latent DiT for {cfg.data}",
        "",
        "A class-conditional latent diffusion model trained by `mgd3 pretrain` (diffusers DiT pipeline layout:",
        "`model_index.json`, `transformer/`, `vae/`, `scheduler/`).",
        "",
        f"- Data: {cfg.data}, {len(data.class_ids)} classes ({', '.join(data.class_names)}), "
        f"{data.resolution}x{data.resolution}x{data.channels}",
        f"- Command: `{cfg.command or 'mgd3 pretrain ...'}`",
        f"- Device: {device}; bf16 autocast: {cfg.bf16}",
        f"- VAE: AutoencoderKL, {cfg.vae_levels} levels, width {cfg.vae_width}, latent "
        f"{cfg.latent_channels}x{data.resolution // 2 ** (cfg.vae_levels - 1)}x{data.resolution // 2 ** (cfg.vae_levels - 1)}, "
        f"{cfg.vae_epochs} epochs, final loss {stats.get('vae_loss', [float('nan')])[-1]:.4f}, "
        f"{sum(stats.get('vae_epoch_s', [])):.0f} s",
        f"- DiT: size {cfg.size} ({n_params / 1e6:.2f} M params; {SIZES[cfg.size]}), eps-prediction, fixed variance, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, EMA {cfg.ema_decay}, label dropout "
        f"{cfg.label_dropout}, final loss {stats.get('dit_loss', [float('nan')])[-1]:.4f}, "
        f"{sum(stats.get('dit_epoch_s', [])):.0f} s",
        f"- Total wall time: {stats.get('total_s', 0):.0f} s",
        f"- VAE reconstruction PSNR on the test split: {stats.get('vae_test_psnr_db', float('nan')):.2f} dB",
        f"- Recommended sampling: CFG {cfg.cfg} (in `mgd3.json`)",
    ]
    if quality:
        lines += ["", "## Quality (measured by mgd3's own code)", ""]
        lines += [f"- {k}: {v}" for k, v in quality.items()]
    lines += ["", "Per-epoch sample grids: `samples/` (training output; not shipped)."]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    d = PretrainConfig(data="", out="")
    p = sub.add_parser("pretrain", help="train a VAE + class-conditional latent DiT and write a DiT pipeline folder",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset name or image folder (as for distill)")
    p.add_argument("--out", required=True, help="output pipeline folder (re-running continues from checkpoints)")
    p.add_argument("--classes", nargs="+", help="train on these classes only")
    p.add_argument("--data-root", help="ImageNet root for the named ImageNet subsets")
    p.add_argument("--resolution", type=int, help="image size (default: the data's native size)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="image channels (default: the data's)")
    p.add_argument("--size", default=d.size, choices=list(SIZES), help="DiT size preset")
    p.add_argument("--vae-epochs", type=int, default=d.vae_epochs, help="VAE training epochs")
    p.add_argument("--vae-width", type=int, default=d.vae_width, help="VAE base channel width")
    p.add_argument("--vae-levels", type=int, default=d.vae_levels, help="VAE resolution levels (downsampling 2^(levels-1))")
    p.add_argument("--epochs", type=int, default=d.epochs, help="DiT training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="DiT learning rate (AdamW)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay per step")
    p.add_argument("--label-dropout", type=float, default=d.label_dropout, help="probability of the null class (CFG)")
    p.add_argument("--cfg", type=float, default=d.cfg, help="recommended CFG scale written to mgd3.json")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=d.seed, help="training seed")
    p.add_argument("--limit", type=int, help="use only N random train images (smoke tests)")
    p.add_argument("--max-steps", type=int, help="at most N optimiser steps per stage (smoke tests)")
    p.add_argument("--overwrite", action="store_true", help="retrain over a finished model folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
          if hasattr(args, f.name) and f.name not in ("command", "progress")}
    cfg = PretrainConfig(**kw, progress=not args.quiet, command="mgd3 " + " ".join(sys.argv[1:]))
    t = time.perf_counter()
    out = pretrain(cfg)
    print(f"wrote model {out} in {time.perf_counter() - t:.0f} s; card: {out}/MODEL_CARD.md; "
          f"samples: {out}/samples/")
    return 0
