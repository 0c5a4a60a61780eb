"""Backend: Stable Diffusion, text-to-image latent diffusion (Rombach et al., CVPR 2022), in
diffusers format — the text-to-image variant of MGD³ (docs/METHODS.md §2.4: SD v1.5, CFG 8, prompt = the
class name line, e.g. "tench, Tinca tinca").

The folder layout of `stable-diffusion-v1-5`: `model_index.json` (StableDiffusionPipeline),
`unet/` (UNet2DConditionModel), `vae/` (AutoencoderKL with its `scaling_factor`),
`text_encoder/` (CLIPTextModel), `tokenizer/` (CLIPTokenizer), `scheduler/` (any DDPM-family
config: betas and `prediction_type`). Safety checker and feature extractor are not used.

A text model has no class labels of its own: the distill driver calls `set_classes(names)` with
the data's class names, label i becomes data class i, and its prompt is the template with
`{name}` replaced. Prompt embeddings are computed once and kept in a table with one row per
class plus a last row for the negative prompt, which is the unconditional CFG branch. The table
is the model's "label embedder", so DMGD's semantic matching mixes prompt embeddings.

An optional `mgd3.json` in the folder overrides the recommended sampling settings ({"defaults":
{"cfg": 8.0}}).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mgd3.backends.base import BACKENDS, PIPELINE_CLASSES, Backend, read_recommendations
from mgd3.backends.dit import KLVaeMixin, check_sizes, estimate_vae_params, read_config, train_betas
from mgd3.errors import Mgd3Error, first_line
from mgd3.core.sampling import ModelOutput

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "{name}"  # docs/METHODS.md §2.4: the class name line itself
DEFAULT_NEGATIVE_PROMPT = ""  # the empty prompt, as the pipeline's unconditional branch
DEFAULT_CFG = 8.0  # docs/METHODS.md §2.4 (SD v1.5)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def estimate_unet_params(c: dict) -> int:
    """Parameters of a UNet2DConditionModel from its config: resnets (two 3x3 convs) and a
    transformer (attention + cross-attention + MLP) per layer, down and up."""
    widths = [int(w) for w in c.get("block_out_channels", (320, 640, 1280, 1280))]
    per = int(c.get("layers_per_block", 2))
    cross = int(c.get("cross_attention_dim", 768) if not isinstance(c.get("cross_attention_dim"), list) else 768)
    return sum((18 * w * w + 12 * w * w + 2 * w * cross) * (2 * per + 1) for w in widths)


def estimate_text_params(c: dict) -> int:
    h = int(c.get("hidden_size", 768))
    return int(c.get("num_hidden_layers", 12)) * 12 * h * h + int(c.get("vocab_size", 49408)) * h


class PromptEmbedding(torch.nn.Module):
    """Label -> flattened prompt embedding, (N,) -> (N, L·D); row num_classes = negative prompt.

    Named `embedding_table` like the DiT label embedder so a hook (DMGD) can look up other rows.
    """

    def __init__(self, table: Tensor):
        super().__init__()
        self.embedding_table = torch.nn.Embedding.from_pretrained(table, freeze=True)  # (C + 1, L·D)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" bars or unused-key notes from transformers while loading (restored after)."""
    from transformers.utils import logging as tf_logging

    bars, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _load_parts(path: Path) -> tuple:
    """(unet, VAE, text encoder, tokenizer) of a Stable Diffusion folder; the tokenizer is tried
    on one prompt, so a broken one fails here."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            unet = UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False)
            vae = AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False)
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
            tokenizer(["probe"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    except Exception as e:  # noqa: BLE001  (tokenizers fail in many ways: all are a broken folder)
        first = first_line(e)
        raise Mgd3Error(f"could not load the Stable Diffusion pipeline in {path}: {first}") from None
    return unet, vae, text_encoder, tokenizer


def _check_parts(path: Path, unet, vae, text_encoder) -> None:
    """A one-line Mgd3Error unless the loaded parts make a plain text-to-image model."""
    uc, vc = unet.config, vae.config
    c = vc.latent_channels
    if uc.in_channels != c:
        raise Mgd3Error(f"{path}/unet: in_channels {uc.in_channels} != VAE latent channels {c} "
                        "(an inpainting or depth model is not a text-to-image model)")
    if uc.out_channels != c:
        raise Mgd3Error(f"{path}/unet: out_channels {uc.out_channels} != VAE latent channels {c}")
    if uc.addition_embed_type is not None or uc.class_embed_type is not None:
        raise Mgd3Error(f"{path}/unet needs extra conditioning ({uc.addition_embed_type or uc.class_embed_type}); "
                        "only plain text-conditioned UNets (SD v1.x/v2.x) are supported")
    hidden = text_encoder.config.hidden_size
    if uc.cross_attention_dim != hidden:
        raise Mgd3Error(f"{path}: unet cross_attention_dim {uc.cross_attention_dim} != text encoder "
                        f"hidden size {hidden}")


class StableDiffusionBackend(KLVaeMixin, Backend):
    def __init__(self, path: Path, index: dict, device: torch.device, precision: str):
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (path / sub).is_dir():
                raise Mgd3Error(f"{path} is not a Stable Diffusion pipeline folder (no {sub}/ sub-folder)")
        sched_cfg = read_config(path / "scheduler" / "scheduler_config.json")
        check_sizes(path, {"unet": (estimate_unet_params, "UNet"), "vae": (estimate_vae_params, "VAE"),
                           "text_encoder": (estimate_text_params, "text encoder")})
        prediction = sched_cfg.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise Mgd3Error(f"{path}/scheduler: prediction_type {prediction!r} is not supported; "
                            f"supported: {', '.join(PREDICTION_TYPES)}")
        unet, vae, text_encoder, tokenizer = _load_parts(path)
        _check_parts(path, unet, vae, text_encoder)
        uc, vc = unet.config, vae.config
        c = vc.latent_channels
        self.down = 2 ** (len(vc.block_out_channels) - 1)  # VAE downsampling (8 for SD)
        size = uc.sample_size if isinstance(uc.sample_size, int) else int(uc.sample_size[0])
        defaults = {"cfg": DEFAULT_CFG, **read_recommendations(path)}
        super().__init__(
            name="stable-diffusion", path=path, latent_shape=(c, size, size), image_channels=vc.in_channels,
            resolution=size * self.down, num_classes=0, learned_sigma=False,
            betas=train_betas(path / "scheduler"), id2label={}, defaults=defaults,
            device=device, precision=precision,
        )
        self.prediction_type = prediction
        # ᾱ per training timestep, for converting v-prediction to ε
        self._alpha_bar = torch.from_numpy(np.cumprod(1.0 - self.betas)).to(device)  # (T,) float64
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scaling_factor = float(vc.scaling_factor)
        self.shift_factor = float(getattr(vc, "shift_factor", None) or 0.0)
        self._vae_dir = path / "vae"
        self.prompt = DEFAULT_PROMPT
        self.negative_prompt = DEFAULT_NEGATIVE_PROMPT
        self.prompts: list[str] = []  # one per label
        self._text_cache: dict[str, Tensor] = {}  # prompt -> (L, D) embedding, computed once
        self._table: PromptEmbedding | None = None

    # --- resolution and classes (set by the distill driver)
    def set_resolution(self, resolution: int) -> None:
        """Generate at `resolution` px: latents (C, resolution/8, resolution/8) for SD."""
        if isinstance(resolution, bool) or resolution < self.down or resolution % self.down:
            raise Mgd3Error(f"--resolution must be a positive multiple of {self.down} for this model, "
                            f"got {resolution}")
        r = int(resolution)
        self.resolution = r
        self.latent_shape = (self.latent_shape[0], r // self.down, r // self.down)

    def set_classes(self, names: list[str], prompt: str | None = None,
                    negative_prompt: str | None = None) -> list[int]:
        """Label i = class i, prompted by `prompt` with {name} replaced by names[i]; returns the labels."""
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        negative = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        if "{name}" not in prompt:
            raise Mgd3Error(f"--prompt must contain {{name}} (the class name), got {prompt!r}")
        if not names:
            raise Mgd3Error("a text-to-image model needs at least one class name")
        self.prompt, self.negative_prompt = prompt, negative
        self.prompts = [prompt.replace("{name}", n) for n in names]
        self.id2label = dict(enumerate(names))
        self.num_classes = len(names)
        rows = self.text_embeddings(self.prompts + [negative])  # (C + 1, L, D)
        self._text_shape = tuple(rows.shape[1:])
        self._table = PromptEmbedding(rows.flatten(1)).to(self.device)
        log.debug("prompts: %s; negative prompt: %r", self.prompts, negative)
        return list(range(len(names)))

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """CLIP last hidden states, (N, L, D) float32, as StableDiffusionPipeline; cached by prompt."""
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            tok = self.tokenizer
            ids = tok(todo, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
            full = tok(todo, padding="longest").input_ids
            for p, f in zip(todo, full):
                if len(f) > tok.model_max_length:
                    log.warning("prompt %r is longer than the text encoder's %d tokens and was truncated",
                                p, tok.model_max_length)
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = ids.attention_mask.to(self.device)
            hidden = self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0]  # (N, L, D)
            for p, h in zip(todo, hidden.float()):
                self._text_cache[p] = h
        return torch.stack([self._text_cache[p] for p in prompts])

    # --- conditioning
    def _require_classes(self) -> None:
        if self._table is None:
            raise Mgd3Error("the Stable Diffusion backend has no classes yet (call set_classes with the class names)")

    def label_embedders(self) -> list[torch.nn.Module]:
        self._require_classes()
        return [self._table]

    def cond(self, labels: list[int]) -> Tensor:
        self._require_classes()
        bad = [y for y in labels if not 0 <= y < self.num_classes]
        if bad:
            raise Mgd3Error(f"class label {bad[0]} is outside the model's 0..{self.num_classes - 1}")
        return torch.as_tensor(labels, dtype=torch.long, device=self.device)

    def uncond(self) -> Tensor:
        self._require_classes()
        return torch.full((1,), self.num_classes, dtype=torch.long, device=self.device)  # the negative prompt

    # --- model
    def denoiser(self, x_t: Tensor, t: Tensor, cond: Tensor) -> ModelOutput:
        self._require_classes()
        text = self._table(cond.to(self.device)).view(len(cond), *self._text_shape)  # (B, L, D)
        with self.autocast():
            out = self.unet(x_t, t, encoder_hidden_states=text).sample  # (B, C, h, w)
        out = out.float()
        if self.prediction_type == "v_prediction":
            # v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0 (Salimans & Ho, 2022) and x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε
            # give ε = sqrt(1-ᾱ)·x_t + sqrt(ᾱ)·v
            a = self._alpha_bar[t.to(self.device).long()].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            out = (1.0 - a).sqrt() * x_t.float() + a.sqrt() * out
        return ModelOutput(out)

    # --- VAE: KLVaeMixin. Modes use the posterior mean (deterministic and cacheable); the official
    # SD variant of MGD³ used a sample, latent_dist.sample() × scaling_factor.


BACKENDS.add("stable-diffusion", StableDiffusionBackend)
PIPELINE_CLASSES["StableDiffusionPipeline"] = "stable-diffusion"
# StableDiffusionXLPipeline is not registered: it needs two text encoders, pooled text embeddings
# and size conditioning; load_backend names it as unsupported in one line.
