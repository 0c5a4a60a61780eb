"""Backend: class-conditional latent diffusion with a UNet denoiser (Rombach et al., CVPR 2022), the
CompVis `cin256-v2` design: a `ClassEmbedder` turns the class label into a single context token
that every cross-attention layer of the UNet attends to; a VQ or KL first stage; a DDPM-family
scheduler.

Diffusers has no class-conditional LDM pipeline, so the folder layout is mgd3's own, built from
diffusers parts (every component loads with its own `from_pretrained`):

    model_index.json   {"_class_name": "LDMClassConditionalPipeline", "unet": [...], "class_embedder":
                        [...], "vae": [...], "scheduler": [...], "id2label": {"0": "name", ...}}
    unet/              UNet2DConditionModel (ε-prediction; cross_attention_dim = the embedding size;
                       out_channels = 2 × in_channels means learned variance, as DiT)
    class_embedder/    ClassEmbedder (this module): config.json {"num_classes": C, "embed_dim": D} and
                       diffusion_pytorch_model.safetensors with one tensor, embedding_table.weight (C + 1, D)
    vae/               VQModel (cin256-v2; latents are the pre-quantisation `quant_conv` output and
                       decoding quantises, as CompVis' VQModelInterface) or AutoencoderKL (posterior mean)
    scheduler/         any DDPM-family scheduler config (the training betas)
    mgd3.json          optional recommended settings, as for DiT

`LDMClassConditionalPipeline` is a name, not a diffusers class: `DiffusionPipeline.from_pretrained`
cannot load the folder, mgd3 and its components' own loaders can. The null (unconditional) class
is the last row of the embedding table, index `num_classes` from the config (cin256-v2: 1001 rows,
null class 1000), never a literal. `mgd3 convert-ldm` writes this layout from a CompVis checkpoint;
`mgd3 pretrain --arch unet` trains one.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from mgd3.backends.base import BACKENDS, PIPELINE_CLASSES, Backend
from mgd3.backends.dit import ClassLabelMixin, KLVaeMixin, train_betas
from mgd3.files import folder_fingerprint
from mgd3.errors import Mgd3Error, first_line
from mgd3.core.sampling import ModelOutput

log = logging.getLogger(__name__)

PIPELINE_CLASS = "LDMClassConditionalPipeline"
SUBFOLDERS = ("unet", "class_embedder", "vae", "scheduler")


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Class label -> context vector (B,) -> (B, D): one learned row per class and a last row for
    the null class (CompVis `ClassEmbedder` with n_classes = num_classes + 1). The UNet sees the
    vector as a 1-token context. The table is `embedding_table`, as in diffusers' LabelEmbedding,
    so DMGD's semantic matching mixes these embeddings."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 1000, embed_dim: int = 512):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        return int(self.config.num_classes)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


@dataclass
class _Out:
    sample: Tensor


class ClassConditionalUNet(nn.Module):
    """UNet2DConditionModel + ClassEmbedder as one module with the DiT call signature
    `model(x_t, timestep=t, class_labels=y).sample` (what `mgd3 pretrain` trains)."""

    def __init__(self, unet, class_embedder: ClassEmbedder):
        super().__init__()
        self.unet, self.class_embedder = unet, class_embedder

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Tensor) -> _Out:
        context = self.class_embedder(class_labels)[:, None, :]  # (B, 1, D)
        return _Out(self.unet(sample, timestep, encoder_hidden_states=context).sample)


# UNet size presets for `mgd3 pretrain --arch unet` (the names of the DiT presets; parameter counts
# for 4 latent channels at 7x7 and 10 classes, next to the DiT preset's): level widths, resnets per
# level, attention heads. The first level has no attention, the others cross-attend (cin256-v2 design).
UNET_SIZES: dict[str, dict] = {
    "tiny": dict(widths=(16, 32), layers_per_block=1, heads=2),  # 0.25 M (DiT tiny 0.06 M)
    "small": dict(widths=(32, 64), layers_per_block=2, heads=4),  # 1.45 M (DiT small 1.4 M)
    "medium": dict(widths=(64, 64, 128), layers_per_block=1, heads=4),  # 4.72 M (DiT medium 4.6 M)
    "base": dict(widths=(64, 128, 192), layers_per_block=1, heads=4),  # 11.0 M (DiT base 10.7 M)
}


def build_unet(latent_channels: int, latent_size: int, num_classes: int, size: str = "medium",
               embed_dim: int | None = None) -> ClassConditionalUNet:
    """A class-conditional latent UNet (the `size` preset): UNet2DConditionModel cross-attending to
    a 1-token ClassEmbedder context of `embed_dim` (default: the last level's width). As the
    openaimodel UNet, the output conv, every resnet's second conv and every transformer's proj_out
    start at zero, and the class table at N(0, 1) (torch's default, CompVis' ClassEmbedder)."""
    from diffusers import UNet2DConditionModel

    if size not in UNET_SIZES:
        raise Mgd3Error(f"unknown --size {size!r}; known: {', '.join(UNET_SIZES)}")
    p = UNET_SIZES[size]
    widths = p["widths"]
    embed_dim = embed_dim or widths[-1]
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        block_out_channels=widths, layers_per_block=p["layers_per_block"], cross_attention_dim=embed_dim,
        attention_head_dim=p["heads"],  # diffusers' name for the number of heads (SD v1 convention)
        norm_num_groups=16,
    )
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if name == "conv_out" or name.endswith(".conv2") or name.endswith(".proj_out"):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
    return ClassConditionalUNet(unet, ClassEmbedder(num_classes=num_classes, embed_dim=embed_dim))


def save_pipeline(path: str | Path, unet, class_embedder: ClassEmbedder, vae, scheduler,
                  id2label: dict[int | str, str] | None = None) -> Path:
    """Write the folder layout above (safetensors); model_index.json last."""
    import diffusers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for sub, module in (("unet", unet), ("class_embedder", class_embedder), ("vae", vae)):
        module.save_pretrained(path / sub, safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(unet).__name__],
        "class_embedder": ["mgd3.backends.unet", "ClassEmbedder"],
        "vae": ["diffusers", type(vae).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    if id2label:
        index["id2label"] = {str(k): v for k, v in id2label.items()}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _read_json(f: Path) -> dict:
    from mgd3.files import read_json_object

    return read_json_object(f)


def _check_configs(path: Path) -> str:
    """The VAE class of an LDM folder ("VQModel" or "AutoencoderKL"), after the checks that need no weights."""
    for sub in SUBFOLDERS:
        if not (path / sub).is_dir():
            raise Mgd3Error(f"{path} is not a class-conditional LDM folder (no {sub}/ sub-folder)")
    vae_json = _read_json(path / "vae" / "config.json")
    vae_cls = vae_json.get("_class_name")
    if vae_cls not in ("VQModel", "AutoencoderKL"):
        raise Mgd3Error(f"{path}/vae is a {vae_cls!r}; a class-conditional LDM needs a VQModel or AutoencoderKL")
    # configs that do not fit each other, said before the weights fail to load
    unet_json = _read_json(path / "unet" / "config.json")
    emb_json = _read_json(path / "class_embedder" / "config.json")
    ctx, emb = unet_json.get("cross_attention_dim"), emb_json.get("embed_dim")
    if ctx is not None and emb is not None and ctx != emb:
        raise Mgd3Error(f"{path}: unet cross_attention_dim ({ctx}) != class embedder embed_dim ({emb})")
    lat = (vae_json.get("vq_embed_dim") if vae_cls == "VQModel" else None) or vae_json.get("latent_channels")
    if lat is not None and unet_json.get("in_channels") is not None and lat != unet_json["in_channels"]:
        raise Mgd3Error(f"{path}: unet in_channels ({unet_json['in_channels']}) != VAE latent channels ({lat})")
    return vae_cls


def _load_parts(path: Path, vae_cls: str) -> tuple:
    """(unet, class embedder, VAE) of an LDM folder, each through its own `from_pretrained`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False)
            embedder = ClassEmbedder.from_pretrained(path / "class_embedder", low_cpu_mem_usage=False)
            vae = (VQModel if vae_cls == "VQModel" else AutoencoderKL).from_pretrained(
                path / "vae", low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, EnvironmentError) as e:
        raise Mgd3Error(f"could not load the class-conditional LDM in {path}: {first_line(e)}") from None
    return unet, embedder, vae


def _check_parts(path: Path, unet, embedder: ClassEmbedder, vae, vq: bool) -> int:
    """The latent channels of loaded LDM parts that fit each other (else a one-line Mgd3Error)."""
    uc, vc, ec = unet.config, vae.config, embedder.config
    c = (vc.vq_embed_dim or vc.latent_channels) if vq else vc.latent_channels
    if uc.in_channels != c:
        raise Mgd3Error(f"{path}: unet in_channels ({uc.in_channels}) != VAE latent channels ({c})")
    if uc.out_channels not in (c, 2 * c):
        raise Mgd3Error(f"{path}/unet: out_channels {uc.out_channels} is neither {c} nor {2 * c}")
    if uc.class_embed_type is not None or uc.addition_embed_type is not None or uc.num_class_embeds:
        raise Mgd3Error(f"{path}/unet has its own class/added embedding; the class-conditional LDM takes the "
                        "class through class_embedder/ and cross-attention only")
    if uc.cross_attention_dim != ec.embed_dim:
        raise Mgd3Error(f"{path}: unet cross_attention_dim ({uc.cross_attention_dim}) != class embedder "
                        f"embed_dim ({ec.embed_dim})")
    rows = embedder.embedding_table.num_embeddings
    if rows != ec.num_classes + 1:
        raise Mgd3Error(f"{path}/class_embedder: {rows} embedding rows, but num_classes {ec.num_classes} "
                        "needs one per class and a null row")
    return c


class LDMBackend(ClassLabelMixin, KLVaeMixin, Backend):
    def __init__(self, path: Path, index: dict, device: torch.device, precision: str):
        vae_cls = _check_configs(path)
        unet, embedder, vae = _load_parts(path, vae_cls)
        uc, vc, ec = unet.config, vae.config, embedder.config
        self.vq = vae_cls == "VQModel"
        c = _check_parts(path, unet, embedder, vae, self.vq)
        id2label = {int(k): v for k, v in (index.get("id2label") or {}).items()}
        outside = sorted(k for k in id2label if not 0 <= k < ec.num_classes)
        if outside:
            raise Mgd3Error(f"{path}: id2label names label {outside[0]}, but the class embedder has "
                            f"{ec.num_classes} classes (0..{ec.num_classes - 1})")
        down = 2 ** (len(vc.block_out_channels) - 1)
        size = uc.sample_size if isinstance(uc.sample_size, int) else int(uc.sample_size[0])
        extra = path / "mgd3.json"
        defaults = _read_json(extra).get("defaults", {}) if extra.is_file() else {}
        prediction = _read_json(path / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise Mgd3Error(f"{path}/scheduler: prediction_type {prediction!r}; the LDM backend takes epsilon")
        super().__init__(
            name="ldm", path=path, latent_shape=(c, size, size), image_channels=vc.in_channels,
            resolution=size * down, num_classes=int(ec.num_classes), learned_sigma=uc.out_channels == 2 * c,
            betas=train_betas(path / "scheduler"), id2label=id2label, defaults=defaults,
            device=device, precision=precision,
        )
        self.null_label = embedder.null_label  # the extra row, from the config
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.class_embedder = embedder.to(device).eval().requires_grad_(False)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.scaling_factor = float(vc.scaling_factor)
        self.shift_factor = float(getattr(vc, "shift_factor", None) or 0.0)
        self._vae_dir = path / "vae"

    def label_embedders(self) -> list[nn.Module]:
        return [self.class_embedder]

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Tensor) -> ModelOutput:
        context = self.class_embedder(cond.to(self.device))[:, None, :]  # (B, 1, D)
        with self.autocast():
            out = self.unet(x_t, t, encoder_hidden_states=context).sample  # (B, C or 2C, h, w)
        out = out.float()
        c = self.latent_shape[0]
        if self.learned_sigma:
            return ModelOutput(out[:, :c], out[:, c:])
        return ModelOutput(out)

    # --- first stage: KLVaeMixin for AutoencoderKL; VQ latents are quant_conv's output (not quantised),
    # decoding quantises first (CompVis VQModelInterface.encode / decode)
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        if not self.vq:
            return super().encode(images)
        with self.autocast():
            h = self.vae.encode(images.to(self.device)).latents
        return (h.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if not self.vq:
            return super().decode(latents)
        with self.autocast():
            images = self.vae.decode(latents.to(self.device) / self.scaling_factor + self.shift_factor).sample
        return images.float().clamp(-1.0, 1.0)

    @property
    def decodes_with_gradients(self) -> bool:
        return not self.vq  # a VQ first stage quantises before decoding

    def decode_differentiable(self, latents: Tensor) -> Tensor:
        if self.vq:
            raise Mgd3Error("a VQ first stage quantises before decoding: no gradient reaches the latents")
        return super().decode_differentiable(latents)

    def vae_fingerprint(self) -> str:
        return folder_fingerprint(self._vae_dir)


BACKENDS.add("ldm", LDMBackend)
PIPELINE_CLASSES[PIPELINE_CLASS] = "ldm"


# --------------------------------------------------------------------------- `mgd3 pretrain` helpers


def _reused_vae_dir(model: str | Path) -> Path:
    p = Path(model).expanduser()
    d = p / "vae" if (p / "vae").is_dir() else p
    if not (d / "config.json").is_file():
        raise Mgd3Error(f"--vae {model}: no vae/config.json there (expected a pipeline folder or its vae/)")
    if _read_json(d / "config.json").get("_class_name") != "AutoencoderKL":
        raise Mgd3Error(f"--vae {model}: {d} is not an AutoencoderKL")
    return d


def reused_vae_settings(model: str | Path) -> tuple[int, int, int]:
    """(latent channels, levels, width) of the AutoencoderKL in `model`/vae (for `pretrain --vae`)."""
    cfg = _read_json(_reused_vae_dir(model) / "config.json")
    widths = cfg.get("block_out_channels") or [0]
    return int(cfg.get("latent_channels", 4)), len(widths), int(widths[0])


def load_reused_vae(model: str | Path, channels: int, resolution: int):
    """The AutoencoderKL of `model`/vae, frozen; it must take the data's channels and resolution."""
    from diffusers import AutoencoderKL

    d = _reused_vae_dir(model)
    try:
        vae = AutoencoderKL.from_pretrained(d, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise Mgd3Error(f"--vae {model}: could not load {d}: {first_line(e)}") from None
    if vae.config.in_channels != channels:
        raise Mgd3Error(f"--vae {model}: the VAE takes {vae.config.in_channels} channels, the data has {channels}")
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % down:
        raise Mgd3Error(f"--vae {model}: resolution {resolution} is not divisible by the VAE's downsampling {down}")
    return vae.eval().requires_grad_(False)


def card_lines(lines: list[str], cfg, n_params: int) -> list[str]:
    """MODEL_CARD.md lines of `mgd3 pretrain` rewritten for --arch unet and --vae."""
    out = []
    for line in lines:
        if cfg.arch == "unet" and line.startswith("# mgd3 latent DiT"):
            line = line.replace("latent DiT", "class-conditional latent UNet (LDM)")
        elif cfg.arch == "unet" and line.startswith("diffusers DiT pipeline layout"):
            line = ("class-conditional LDM layout of mgd3 (`model_index.json` = LDMClassConditionalPipeline, "
                    "`unet/`, `class_embedder/`, `vae/`, `scheduler/`; `mgd3.backends.unet`), so")
        elif cfg.arch == "unet" and line.startswith("`mgd3 distill --model"):
            line = line.replace("like `facebook/DiT-XL-2-256`", "with the LDM backend")
        elif cfg.arch == "unet" and line.startswith("- DiT: size"):
            p = UNET_SIZES[cfg.size]
            line = (f"- UNet: size `{cfg.size}` ({n_params / 1e6:.2f} M params with the class embedder; "
                    f"UNet2DConditionModel, level widths {'/'.join(map(str, p['widths']))}, "
                    f"{p['layers_per_block']} resnet(s) per level, cross-attention ({p['heads']} heads) to a "
                    f"1-token class embedding of size {p['widths'][-1]} below the first level), eps-prediction, "
                    "fixed variance, linear betas 0.0001..0.02 x 1000")
        elif cfg.arch == "unet" and line.startswith("- DiT training:"):
            line = line.replace("- DiT training:", "- UNet training:")
        elif cfg.arch == "unet" and line.startswith("- Final DiT loss"):
            line = line.replace("DiT", "UNet")
        elif cfg.vae and line.startswith("- VAE:"):
            shape = ', '.join(line[len('- VAE: '):].split(', ')[:4])  # class, levels, width, latent shape
            if cfg.vae_decoder_epochs:
                line = (f"- VAE: reused from `{cfg.vae}`, its encoder frozen (the same latents) and its decoder "
                        f"trained {cfg.vae_decoder_epochs} epochs here ({cfg.vae_loss}, lr {cfg.vae_lr:g} cosine, "
                        f"batch {cfg.vae_batch_size or cfg.batch_size}); {shape}")
            else:
                line = f"- VAE: reused, frozen, from `{cfg.vae}` (not trained here); {shape}"
        out.append(line)
    return out
