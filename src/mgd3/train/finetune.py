"""Stage 0b (optional): `mgd3 finetune` — fine-tune a class-conditional latent DiT folder for
dataset distillation and write a diffusers folder that `mgd3 distill --model` loads.

Objective `minimax`: MinMax diffusion (Gu et al., "Efficient Dataset Distillation via Minimax
Diffusion", CVPR 2024; official code vimar-gu/MinimaxDiffusion `train_dit.py`). The diffusion
loss plus two terms on the predicted clean latent ẑ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (the code's
`training_losses(...)["output"]`), per class c of the batch, against two FIFO memories of the
last `memory_size` items of that class:

    representativeness  L_r = 1 − min_{i, m} cos(ẑ_i, z_m)    z_m: real latents (memory M_c)
    diversity           L_d =     max_{i, m} cos(ẑ_i, ẑ'_m)   ẑ'_m: earlier predictions (memory D_c)
    L = L_simple + Σ_c (λ_r L_r + λ_d L_d) / (number of classes in the batch)

min / max run over every (batch item of class c, memory item) pair; latents are flattened; the
terms start once the class has entries in D_c; after a class's terms the batch's real latents
and (detached) predictions of that class enter the memories. Paper: maximise the least
similarity to real data (representativeness), minimise the largest similarity to what was
generated before (diversity). Code defaults, used here: λ_r 0.002 (`--lambda-pos`), λ_d 0.008
(`--lambda-neg`), memory 64 (`--memory-size`), AdamW lr 1e-3, weight decay 0, batch 8
(`run.sh`: `--global-batch-size 8`), DiffFit-style parameter selection (`mark_difffit_trainable`:
biases, norms, the label embedding; the code's extra `gamma` scales do not exist in a diffusers
DiT), EMA 0.9999 saved, label dropout 0.1 to the null class, random horizontal flip, VAE latents
sampled from the posterior, t uniform over the 1000 training steps. The official run samples from
the checkpoint after 12 000 steps (`run.sh`), the default `--steps` here.

Differences: a learned-variance model (DiT-XL/2) is fine-tuned on the ε half's MSE only (the
code adds the VLB term that trains the variance half); mgd3's shipped model has fixed variance.
Fine-tuning does not resume after an interruption (re-run it).
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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mgd3 import files
from mgd3.config import resolve_device
from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)

OBJECTIVES = ("minimax",)
TRAINABLE = ("difffit", "all")
OUTPUTS = ("model_index.json", "transformer", "vae", "scheduler", "mgd3.json", "MODEL_CARD.md")


@dataclass
class FinetuneConfig:
    model: str
    data: str
    out: str
    objective: str = "minimax"
    classes: list[str] | None = None
    data_root: str | None = None
    class_map: str | None = None
    finetune_ipc: int | None = None  # images per class that take part (None: all; official run.sh: -1, all)
    steps: int = 12000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    trainable: str = "difffit"
    lambda_rep: float = 0.002
    lambda_div: float = 0.008
    memory_size: int = 64
    ema_decay: float = 0.9999
    label_dropout: float = 0.1
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True
    command: str = ""


# --------------------------------------------------------------------------- the minimax terms


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(n, D), (m, D) -> (n, m) cosine similarities."""
    return (a @ b.T) / (a.norm(dim=-1)[:, None] * b.norm(dim=-1)[None, :])


def representativeness(pred: Tensor, real: Tensor) -> Tensor:
    """1 − the least cosine similarity between any prediction and any real latent (flattened)."""
    return 1.0 - cosine_matrix(pred.flatten(1), real.flatten(1)).min()


def diversity(pred: Tensor, pseudo: Tensor) -> Tensor:
    """The largest cosine similarity between any prediction and any earlier prediction."""
    return cosine_matrix(pred.flatten(1), pseudo.flatten(1)).max()


class MinimaxMemory:
    """Per class, the last `size` real latents and the last `size` predicted clean latents."""

    def __init__(self, size: int):
        self.size = size
        self.real: dict[int, deque] = {}
        self.pseudo: dict[int, deque] = {}

    def terms(self, pred: Tensor, real: Tensor, classes: Tensor, lambda_rep: float,
              lambda_div: float) -> tuple[Tensor, Tensor]:
        """(λ_r-weighted representativeness, λ_d-weighted diversity) summed over the classes of
        the batch / their number; then the batch enters the memories. pred: (B, C, h, w) ẑ with
        gradient; real: (B, C, h, w) the batch's clean latents; classes: (B,) data class indices."""
        rep = pred.new_zeros(())
        div = pred.new_zeros(())
        present = sorted(set(classes.tolist()))
        for c in present:
            sel = classes == c
            if self.pseudo.get(c):
                rep = rep + representativeness(pred[sel], torch.stack(list(self.real[c]))) * lambda_rep / len(present)
                div = div + diversity(pred[sel], torch.stack(list(self.pseudo[c]))) * lambda_div / len(present)
            self.real.setdefault(c, deque(maxlen=self.size)).extend(real[sel].detach())
            self.pseudo.setdefault(c, deque(maxlen=self.size)).extend(pred[sel].detach())
        return rep, div


# --------------------------------------------------------------------------- training


def mark_trainable(transformer: torch.nn.Module, mode: str) -> int:
    """`difffit`: biases, norm-layer affine parameters and the label embeddings (the official
    `mark_difffit_trainable`); `all`: every parameter. Returns the number of trainable values."""
    norm_params = {id(p) for m in transformer.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
                   for p in m.parameters(recurse=False)}
    for name, p in transformer.named_parameters():
        p.requires_grad_(mode == "all" or name.endswith("bias") or "class_embedder" in name or id(p) in norm_params)
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def _validate(cfg: FinetuneConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise Mgd3Error(f"unknown --objective {cfg.objective!r}; known: {', '.join(OBJECTIVES)}")
    if cfg.trainable not in TRAINABLE:
        raise Mgd3Error(f"unknown --trainable {cfg.trainable!r}; known: {', '.join(TRAINABLE)}")
    for name, v, low in (("--steps", cfg.steps, 1), ("--batch-size", cfg.batch_size, 1),
                         ("--memory-size", cfg.memory_size, 1)):
        if v < low:
            raise Mgd3Error(f"{name} must be at least {low}, got {v}")
    if cfg.finetune_ipc is not None and cfg.finetune_ipc < 1:
        raise Mgd3Error(f"--finetune-ipc must be at least 1, got {cfg.finetune_ipc}")
    for name, v in (("--lr", cfg.lr), ("--weight-decay", cfg.weight_decay), ("--lambda-rep", cfg.lambda_rep),
                    ("--lambda-div", cfg.lambda_div)):
        if not np.isfinite(v) or v < 0:
            raise Mgd3Error(f"{name} must be a finite number >= 0, got {v}")
    for name, v in (("--ema-decay", cfg.ema_decay), ("--label-dropout", cfg.label_dropout)):
        if not 0 <= v < 1:
            raise Mgd3Error(f"{name} must be in [0, 1), got {v}")


def _prepare_out(cfg: FinetuneConfig, model_path: Path) -> Path:
    out = Path(cfg.out).expanduser()
    if out.resolve() == model_path.resolve():
        raise Mgd3Error(f"--out {out} is the model folder being fine-tuned; choose another folder")
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.startswith(".mgd3"))
        if not cfg.overwrite:
            raise Mgd3Error(f"output folder {out} is not empty (use --overwrite to replace a model there)")
        if others:
            raise Mgd3Error(f"output folder {out} holds files that are not a model's ({others[0]}); "
                            "not overwriting them")
        (out / "model_index.json").unlink(missing_ok=True)  # first: never a folder that looks complete
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Mgd3Error(f"cannot create output folder {out} ({e.strerror or e})") from None
    return out


def _sample_latents(backend, x: Tensor, gen: torch.Generator) -> Tensor:
    """Images (B, C, R, R) in [-1, 1] -> scaled latents sampled from the VAE posterior."""
    with torch.no_grad():
        dist = backend.vae.encode(x.to(backend.device)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen).to(backend.device)
        z = dist.mean + dist.std * eps
    return ((z.float() - backend.shift_factor) * backend.scaling_factor)  # (B, c, h, w)


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.objective`; writes cfg.out; returns a summary."""
    from mgd3.backends import load_backend
    from mgd3.io.data import load_data
    from mgd3.backends.labels import map_labels

    t_start = time.perf_counter()
    _validate(cfg)
    device = resolve_device(cfg.device)
    backend = load_backend(cfg.model, device=device)
    if backend.name != "dit":
        raise Mgd3Error(f"mgd3 finetune fine-tunes class-conditional DiT folders; {backend.path} is a "
                        f"{backend.name} model")
    data = load_data(cfg.data, "train", resolution=backend.resolution, channels=backend.image_channels,
                     classes=cfg.classes, data_root=cfg.data_root, class_map=cfg.class_map)
    labels = map_labels(data, backend)
    out = _prepare_out(cfg, backend.path)
    idx, images, classes = _training_images(cfg, data)
    label_of = torch.as_tensor(labels, dtype=torch.long)

    transformer = backend.transformer
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    n_train = mark_trainable(transformer, cfg.trainable)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    abar = torch.from_numpy(np.cumprod(1.0 - backend.betas)).float().to(backend.device)  # (T,)
    memory = MinimaxMemory(cfg.memory_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info("fine-tuning %s (%s, %d of %d parameters trainable) on %d images of %s for %d steps", backend.path,
             cfg.objective, n_train, sum(p.numel() for p in transformer.parameters()), len(idx), cfg.data, cfg.steps)

    history = {"loss": [], "rep": [], "div": []}
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(cfg.steps), desc=f"finetune {cfg.objective}", unit="step", disable=not cfg.progress)
    for step in bar:
        if len(order) < cfg.batch_size:  # a new epoch (drop_last, as the code's DataLoader)
            order = torch.randperm(len(idx), generator=gen)
        b, order = order[:cfg.batch_size], order[cfg.batch_size:]
        terms = _minimax_step(cfg, backend, opt, memory, abar, gen, images[b], classes[b], label_of)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                if p.requires_grad:
                    pe.lerp_(p, 1 - cfg.ema_decay)
        for k, v in zip(("loss", "rep", "div"), terms):
            history[k].append(float(v.detach()))
        if cfg.progress:
            bar.set_postfix(loss=f"{np.mean(history['loss'][-50:]):.4f}", rep=f"{np.mean(history['rep'][-50:]):.5f}",
                            div=f"{np.mean(history['div'][-50:]):.5f}")
    bar.close()
    seconds = time.perf_counter() - t_start
    stats = {"seconds": round(seconds, 1), "trainable_params": n_train,
             "images": len(idx), **{f"{k}_first100": round(float(np.mean(v[:100])), 6) for k, v in history.items()},
             **{f"{k}_last100": round(float(np.mean(v[-100:])), 6) for k, v in history.items()}}
    _save(out, backend, ema, cfg, data, stats)
    return {"out": str(out), "seconds": seconds, "steps": cfg.steps, **stats}


def _training_images(cfg: FinetuneConfig, data) -> tuple[np.ndarray, Tensor, Tensor]:
    """The images that take part: all, or the first finetune_ipc of a seeded permutation per class;
    returns (their indices in data, images uint8 (N, C, R, R), data class indices (N,))."""
    from mgd3.evaluation.train import tensor_set

    rng = np.random.default_rng(cfg.seed)
    items = [rng.permutation(data.indices(c))[:cfg.finetune_ipc] if cfg.finetune_ipc else data.indices(c)
             for c in range(len(data.class_ids))]
    idx = np.sort(np.concatenate(items))
    if len(idx) < cfg.batch_size:
        raise Mgd3Error(f"--batch-size {cfg.batch_size} is larger than the {len(idx)} training images")
    images = tensor_set(data.dataset(idx), progress=cfg.progress, desc=f"loading {cfg.data}").images  # uint8
    classes = torch.as_tensor(data.targets[idx], dtype=torch.long)  # (N,) data class index
    return idx, images, classes


def _minimax_step(cfg: FinetuneConfig, backend, opt, memory: MinimaxMemory, abar: Tensor, gen: torch.Generator,
                  images: Tensor, ry: Tensor, label_of: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One optimiser step of the MinMax objective on a batch of uint8 images (B, C, R, R) of data
    classes ry (B,); draws the flips, the posterior sample, the label drops, t and the noise from
    gen, in that order. Returns (diffusion loss, weighted representativeness, weighted diversity)."""
    transformer = backend.transformer
    x = images.float() / 127.5 - 1.0  # (B, C, R, R) in [-1, 1]
    if cfg.flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(3), x)
    z = _sample_latents(backend, x, gen)  # (B, c, h, w) clean latents
    y = label_of[ry]
    y = torch.where(torch.rand(len(x), generator=gen) < cfg.label_dropout, torch.full_like(y, backend.null_label), y)
    t = torch.randint(0, len(abar), (len(x),), generator=gen).to(backend.device)
    noise = torch.randn(z.shape, generator=gen).to(backend.device)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise  # (B, c, h, w)
    eps = transformer(x_t, timestep=t, class_labels=y.to(backend.device)).sample.float()[:, :backend.latent_shape[0]]
    loss = F.mse_loss(eps, noise)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()  # ẑ, the code's "output"
    rep, div = memory.terms(x0, z, ry, cfg.lambda_rep, cfg.lambda_div)
    opt.zero_grad(set_to_none=True)
    (loss + rep + div).backward()
    opt.step()
    return loss, rep, div


def _save(out: Path, backend, ema, cfg: FinetuneConfig, data, stats: dict) -> None:
    """transformer/ (EMA weights, as the official checkpoint's `ema` is what it samples from),
    vae/ and scheduler/ copied, mgd3.json (the source's defaults + the fine-tune record),
    MODEL_CARD.md, and model_index.json last: its presence means the folder is complete."""
    from mgd3.files import folder_fingerprint

    src = backend.path
    for sub in ("vae", "scheduler"):
        shutil.copytree(src / sub, out / sub)
    ema.save_pretrained(out / "transformer", safe_serialization=True)
    extra = files.read_json_object(src / "mgd3.json", "mgd3.json") if (src / "mgd3.json").is_file() else {}
    record = {"objective": cfg.objective, "base_model": str(src), "base_fingerprint": folder_fingerprint(src),
              "data": cfg.data, "classes": list(data.class_ids), "config": dataclasses.asdict(cfg), "stats": stats}
    meta = {"defaults": extra.get("defaults", {}), "trained_by": "mgd3 finetune", "data": cfg.data,
            "classes": list(data.class_ids), "finetune": record, "base": {k: v for k, v in extra.items()
                                                                         if k != "defaults"}}
    (out / "mgd3.json").write_text(json.dumps(meta, indent=2))
    c = cfg
    card = f"""# {src.name} fine-tuned with the {c.objective} objective

A copy of `{src}` whose transformer was fine-tuned by `mgd3 finetune` with MinMax diffusion
(Gu et al., CVPR 2024): the diffusion loss plus the representativeness (λ_r {c.lambda_rep}) and
diversity (λ_d {c.lambda_div}) terms against per-class memories of {c.memory_size} items. Sample from it with
`mgd3 distill --model {out} --method plain` (the MinMax row) or `--method mgd3` (MinMax + MGD³).

- Command: `{c.command or '(library call)'}`
- Data: {c.data}, {stats['images']} train images of {len(data.class_ids)} classes ({', '.join(data.class_ids)})
- Steps: {c.steps} at batch {c.batch_size}; AdamW lr {c.lr}, weight decay {c.weight_decay}; trainable:
  {c.trainable} ({stats['trainable_params']} values); EMA {c.ema_decay} (saved); label dropout {c.label_dropout};
  horizontal flip {c.flip}; seed {c.seed}
- Losses (mean of the first / last 100 steps): diffusion {stats['loss_first100']} / {stats['loss_last100']},
  representativeness (weighted) {stats['rep_first100']} / {stats['rep_last100']},
  diversity (weighted) {stats['div_first100']} / {stats['div_last100']}
- Time: {stats['seconds']} s on {backend.device}
"""
    (out / "MODEL_CARD.md").write_text(card)
    shutil.copyfile(src / "model_index.json", out / ".model_index.json.tmp")
    (out / ".model_index.json.tmp").replace(out / "model_index.json")


# --------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    """Add the `finetune` sub-command."""
    d = FinetuneConfig(model="", data="", out="")
    p = sub.add_parser(
        "finetune", help="fine-tune a DiT folder for dataset distillation (MinMax diffusion)",
        description="Fine-tune a class-conditional latent DiT folder (the shipped model or your own) with a "
                    "dataset-distillation objective and write a diffusers folder that `mgd3 distill --model` "
                    "loads, with MODEL_CARD.md and mgd3.json recording the objective, data and steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="DiT pipeline folder (e.g. src/mgd3/models/fashion-mnist)")
    p.add_argument("--objective", default=d.objective, help=f"fine-tuning objective: {', '.join(OBJECTIVES)}")
    p.add_argument("--data", required=True, help="real data: fashion-mnist, digits, ..., or an image folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output pipeline folder (new or empty)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="fine-tune on these classes only")
    p.add_argument("--data-root", help="ImageNet-1K root for the named ImageNet subsets")
    p.add_argument("--class-map", help="file mapping class ids to model labels")
    p.add_argument("--finetune-ipc", type=int, metavar="N", help="use N random images per class (default all)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (official run: 12000)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (official: 8)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (official: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (official: 0)")
    p.add_argument("--trainable", default=d.trainable, choices=TRAINABLE,
                   help="parameters trained: difffit (biases, norms, label embeddings; official) or all")
    p.add_argument("--lambda-rep", type=float, default=d.lambda_rep,
                   help="weight of the representativeness term (official --lambda-pos 0.002)")
    p.add_argument("--lambda-div", type=float, default=d.lambda_div,
                   help="weight of the diversity term (official --lambda-neg 0.008)")
    p.add_argument("--memory-size", type=int, default=d.memory_size, help="items per class in each memory (64)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay per step; the EMA is saved")
    p.add_argument("--label-dropout", type=float, default=d.label_dropout, help="null-class probability (CFG)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip of the real images")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random draw")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
          if hasattr(args, f.name) and f.name not in ("command", "progress", "flip")}
    cfg = FinetuneConfig(**kw, flip=not args.no_flip, progress=not args.quiet,
                         command="mgd3 " + " ".join(sys.argv[1:]))
    if args.threads is not None:
        if args.threads < 1:
            raise Mgd3Error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    s = finetune(cfg)
    print(f"wrote model {s['out']} ({s['steps']} {cfg.objective} steps in {s['seconds'] / 60:.1f} min); "
          f"card: {s['out']}/MODEL_CARD.md; use it with: mgd3 distill --data {cfg.data} --model {s['out']}")
    return 0
