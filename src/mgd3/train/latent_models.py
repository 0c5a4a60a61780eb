"""The latent models `mgd3 pretrain` trains, built and initialised: the AutoencoderKL and the
class-conditional DiT (or, with --arch unet, the latent UNet of `mgd3.backends.unet`), with the
device and bf16-autocast helpers the stages share."""

from __future__ import annotations

import math

import torch

from mgd3.config import resolve_device
from mgd3.errors import Mgd3Error
from mgd3.train.pretrain_settings import PretrainConfig, dit_size


def torch_device(name: str) -> torch.device:
    """The torch device of --device (auto: `mgd3.config.resolve_device`); an unknown name is one error line."""
    if name == "auto":
        return torch.device(resolve_device(name))
    try:
        return torch.device(name)
    except RuntimeError:
        raise Mgd3Error(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto") from None


def autocast(device: torch.device, bf16: bool):
    """Autocast to bf16 on `device`'s type, enabled only with --bf16."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


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
