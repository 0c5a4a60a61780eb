"""Backend: class-conditional latent DiT in diffusers format (Peebles & Xie, 2023).

The folder layout of `facebook/DiT-XL-2-256`: `model_index.json` (DiTPipeline, `id2label`),
`transformer/` (Transformer2DModel or DiTTransformer2DModel, ada-norm-zero; learned sigma when
out_channels = 2 × in_channels), `vae/` (AutoencoderKL with its `scaling_factor`), `scheduler/`.
An optional `mgd3.json` in the folder holds recommended settings: {"defaults": {"cfg": 1.5, "methods":
{"mgd3": {"lambda": 0.3}}}} (method options by their flag without "--"; what the user gives wins).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mgd3.backends.base import (BACKENDS, PIPELINE_CLASSES, Backend, check_model_size, check_vae_channels,
                                read_id2label, read_json_object, read_recommendations)
from mgd3.errors import Mgd3Error, first_line
from mgd3.files import folder_fingerprint
from mgd3.core.sampling import ModelOutput

log = logging.getLogger(__name__)


def train_betas(scheduler_dir: Path) -> np.ndarray:
    """The training betas from the folder's scheduler config (any diffusers DDPM-family scheduler)."""
    from diffusers import DDPMScheduler

    cfg_file = scheduler_dir / "scheduler_config.json"
    if not cfg_file.is_file():
        raise Mgd3Error(f"{scheduler_dir.parent} has no scheduler/scheduler_config.json")
    cfg = read_json_object(cfg_file)
    try:
        n = int(cfg.get("num_train_timesteps", 1000))
        start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    except (TypeError, ValueError):
        raise Mgd3Error(f"{cfg_file}: num_train_timesteps, beta_start and beta_end must be numbers") from None
    if not (1 <= n <= 100_000 and 0 < start <= end < 1):
        raise Mgd3Error(f"{cfg_file}: needs 1 <= num_train_timesteps <= 100000 and 0 < beta_start <= beta_end < 1")
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and schedule == "linear":  # float64, as the DiT code
        return np.linspace(start, end, n, dtype=np.float64)
    if cfg.get("trained_betas") is None and schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
            sched = DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as e:
        first = first_line(e)
        raise Mgd3Error(f"{cfg_file}: unusable noise schedule ({first[:200]})") from None
    betas = sched.betas.double().numpy()
    if not (np.isfinite(betas).all() and ((betas > 0) & (betas < 1)).all()):
        raise Mgd3Error(f"{cfg_file}: the betas must be finite and in (0, 1)")
    return betas


def estimate_dit_params(c: dict) -> int:
    """Parameters of a diffusers DiT from its config: per block attention (4h²), MLP (8h²),
    adaLN-Zero modulation (6h²), its own label table ((classes + 1)·h) and timestep MLP."""
    h = int(c.get("num_attention_heads", 16)) * int(c.get("attention_head_dim", 72))
    layers = int(c.get("num_layers", 28))
    classes = int(c.get("num_embeds_ada_norm") or 1000)
    p = int(c.get("patch_size", 2))
    cin = int(c.get("in_channels", 4))
    return layers * (18 * h * h + (classes + 1) * h + 256 * h + h * h) + 2 * cin * p * p * h


def estimate_vae_params(c: dict) -> int:
    """Parameters of a diffusers AutoencoderKL from its config: two 3x3 convs per resnet, encoder
    and decoder (layers_per_block + 1 resnets per level on the decoder side)."""
    widths = [int(w) for w in c.get("block_out_channels", (64,))]
    per = int(c.get("layers_per_block", 1))
    return sum(18 * w * w * (2 * per + 1) for w in widths) + 18 * widths[-1] ** 2 * 4


def check_sizes(path: Path, parts: dict) -> None:
    """Every sub-model's size estimated from its config before anything is built."""
    for sub, (estimate, what) in parts.items():
        check_model_size(path / sub / "config.json", estimate, what)


def read_config(f: Path) -> dict:
    return read_json_object(f) if f.is_file() else {}


def classes_in_use(id2label: dict[int, str], num_embeds: int) -> int:
    """The model's classes: labels 0..n-1 when id2label names exactly those and n < num_embeds
    (a small model stored in diffusers' DiTPipeline layout, its table padded to the null class at
    1000: `null_class_at_1000`), else every label of the table (num_embeds_ada_norm)."""
    n = len(id2label)
    if 0 < n < num_embeds and set(id2label) == set(range(n)):
        return n
    return num_embeds


CLASS_TABLE = "class_embedder.embedding_table.weight"  # every block's label embedding (rows, hidden)
DIFFUSERS_NULL = 1000  # diffusers' DiTPipeline passes label 1000 as the unconditional class


def null_class_at_1000(folder: Path) -> None:
    """Rewrite a DiT folder of n < 1000 classes (class tables of n + 1 rows, the null class last)
    into the layout diffusers' `DiTPipeline` assumes at any guidance scale: every block's table
    gets 1001 rows — rows 0..n-1 the classes, row 1000 the null class, rows n..999 zeros (never
    used: mgd3 refuses labels >= n, and zeros compress to nothing in git and in a wheel) — and
    `num_embeds_ada_norm` becomes 1000. Every row mgd3 looks up keeps its values, so every sampled
    latent stays the same; mgd3 reads the n classes from id2label (`classes_in_use`)."""
    import json

    from safetensors.torch import load_file, save_file

    from mgd3.files import write_atomic, write_text_atomic

    tdir = Path(folder) / "transformer"
    cfg = read_json_object(tdir / "config.json")
    n = int(cfg["num_embeds_ada_norm"])
    if n >= DIFFUSERS_NULL:
        raise Mgd3Error(f"{tdir}: num_embeds_ada_norm is {n}; the null class is already at {n}")
    f = tdir / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    tables = [k for k in state if k.endswith(CLASS_TABLE)]
    if not tables:
        raise Mgd3Error(f"{f} has no class tables ({CLASS_TABLE})")
    for k in tables:
        old = state[k]  # (n + 1, hidden)
        if old.shape[0] != n + 1:
            raise Mgd3Error(f"{f}: {k} has {old.shape[0]} rows, expected {n + 1}")
        new = torch.zeros(DIFFUSERS_NULL + 1, old.shape[1], dtype=old.dtype)  # (1001, hidden)
        new[:n] = old[:n]
        new[DIFFUSERS_NULL] = old[n]
        state[k] = new
    write_atomic(f, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    cfg["num_embeds_ada_norm"] = DIFFUSERS_NULL
    write_text_atomic(tdir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


class KLVaeMixin:
    """The VAE side of a backend built on a diffusers AutoencoderKL (DiT and Stable Diffusion):
    needs `vae`, `scaling_factor`, `shift_factor`, `_vae_dir` and `autocast()`. Latents are the
    posterior mean, shifted and scaled as the pipeline does."""

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        with self.autocast():
            mean = self.vae.encode(images.to(self.device)).latent_dist.mean
        return (mean.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        with self.autocast():
            images = self.vae.decode(latents.to(self.device) / self.scaling_factor + self.shift_factor).sample
        return images.float().clamp(-1.0, 1.0)

    decodes_with_gradients = True

    def decode_differentiable(self, latents: Tensor) -> Tensor:
        """`decode` without no_grad and without the clamp (the released IGD decodes so)."""
        with self.autocast():
            images = self.vae.decode(latents.to(self.device) / self.scaling_factor + self.shift_factor).sample
        return images.float()

    def vae_fingerprint(self) -> str:
        return folder_fingerprint(self._vae_dir)


class ClassLabelMixin:
    """Class-label conditioning of a class-conditional backend (DiT, the LDM UNet): labels
    0..num_classes-1, the null (unconditional) class the extra embedding row `null_label`. Needs
    `num_classes`, `null_label` and `device`."""

    def cond(self, labels: list[int]) -> Tensor:
        bad = [y for y in labels if not 0 <= y < self.num_classes]
        if bad:
            raise Mgd3Error(f"class label {bad[0]} is outside the model's 0..{self.num_classes - 1}")
        return torch.as_tensor(labels, dtype=torch.long, device=self.device)

    def uncond(self) -> Tensor:
        return torch.full((1,), self.null_label, dtype=torch.long, device=self.device)


class DiTBackend(ClassLabelMixin, KLVaeMixin, Backend):
    def __init__(self, path: Path, index: dict, device: torch.device, precision: str):
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        for sub in ("transformer", "vae", "scheduler"):
            if not (path / sub).is_dir():
                raise Mgd3Error(f"{path} is not a DiT pipeline folder (no {sub}/ sub-folder)")
        # a latent-channel mismatch in the configs, said before the weights fail to load
        vae_c = read_config(path / "vae" / "config.json").get("latent_channels")
        tr_c = read_config(path / "transformer" / "config.json").get("in_channels")
        check_sizes(path, {"transformer": (estimate_dit_params, "DiT"), "vae": (estimate_vae_params, "VAE")})
        check_vae_channels(path / "vae" / "config.json")
        if vae_c is not None and tr_c is not None and vae_c != tr_c:
            raise Mgd3Error(f"{path}: VAE latent channels ({vae_c}) != transformer in_channels ({tr_c})")
        try:
            with warnings.catch_warnings():
                # DiT-XL-2-256 says Transformer2DModel; the weights load into the DiT class as is
                warnings.simplefilter("ignore")
                transformer = DiTTransformer2DModel.from_pretrained(path / "transformer", low_cpu_mem_usage=False)
                vae = AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError,
                ZeroDivisionError, NotImplementedError, EnvironmentError) as e:
            first = first_line(e)
            raise Mgd3Error(f"could not load the DiT pipeline in {path}: {first[:300]}") from None
        tc, vc = transformer.config, vae.config
        if tc.norm_type != "ada_norm_zero" or tc.num_embeds_ada_norm is None:
            raise Mgd3Error(f"{path}/transformer is not a class-conditional DiT (ada_norm_zero)")
        c_in = tc.in_channels
        c_out = tc.out_channels or c_in
        if c_out not in (c_in, 2 * c_in):
            raise Mgd3Error(f"{path}/transformer: out_channels {c_out} is neither {c_in} nor {2 * c_in}")
        if vc.latent_channels != c_in:
            raise Mgd3Error(
                f"{path}: VAE latent channels ({vc.latent_channels}) != transformer in_channels ({c_in})"
            )
        down = 2 ** (len(vc.block_out_channels) - 1)
        size = tc.sample_size
        id2label = read_id2label(index, path)
        defaults = read_recommendations(path)
        super().__init__(
            name="dit", path=path, latent_shape=(c_in, size, size), image_channels=vc.in_channels,
            resolution=size * down, num_classes=classes_in_use(id2label, int(tc.num_embeds_ada_norm)),
            learned_sigma=c_out == 2 * c_in,
            betas=train_betas(path / "scheduler"), id2label=id2label, defaults=defaults,
            device=device, precision=precision,
        )
        # The null (unconditional) class is the extra row of every label embedder: index
        # num_embeds_ada_norm (1000 for DiT-XL/2 and for the shipped model's diffusers layout),
        # never a literal.
        self.null_label = int(tc.num_embeds_ada_norm)
        for m in transformer.modules():
            if m.__class__.__name__ == "LabelEmbedding":
                if m.embedding_table.num_embeddings <= self.null_label:
                    raise Mgd3Error(f"{path}/transformer has no null-class embedding: it cannot do CFG")
                m.dropout_prob = 0.0  # label dropout belongs to a trainer, never to sampling
        self.transformer = transformer.to(device).eval().requires_grad_(False)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.scaling_factor = float(vc.scaling_factor)
        self.shift_factor = float(getattr(vc, "shift_factor", None) or 0.0)
        self._vae_dir = path / "vae"

    def label_embedders(self) -> list[torch.nn.Module]:
        """Every block's own class-label embedder (diffusers DiT keeps one per block)."""
        return [m for m in self.transformer.modules() if m.__class__.__name__ == "LabelEmbedding"]

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Tensor) -> ModelOutput:
        with self.autocast():
            out = self.transformer(x_t, timestep=t, class_labels=cond).sample  # (B, C or 2C, h, w)
        out = out.float()
        c = self.latent_shape[0]
        if self.learned_sigma:
            return ModelOutput(out[:, :c], out[:, c:])
        return ModelOutput(out)


BACKENDS.add("dit", DiTBackend)
PIPELINE_CLASSES["DiTPipeline"] = "dit"
