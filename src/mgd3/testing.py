"""Tiny real diffusers models for tests and speed benchmarks (no weights to download).

`build_dit_folder` writes a class-conditional DiT pipeline in exactly the layout of
`facebook/DiT-XL-2-256` (model_index.json with id2label, transformer/, vae/, scheduler/),
with real diffusers modules built under a fixed seed and saved with `save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_dit_folder(
    path: str | Path,
    *,
    num_classes: int = 10,
    image_channels: int = 3,
    resolution: int = 16,
    latent_channels: int = 4,
    vae_levels: int = 2,
    vae_width: int = 8,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    patch_size: int = 2,
    learned_sigma: bool = True,
    class_names: list[str] | None = None,
    transformer_class_name: str = "DiTTransformer2DModel",
    seed: int = 0,
) -> Path:
    """Build and save a tiny DiT pipeline; returns the folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    path = Path(path)
    down = 2 ** (vae_levels - 1)
    if resolution % down:
        raise ValueError("resolution must be divisible by the VAE downsampling factor")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=tuple(vae_width * (i + 1) for i in range(vae_levels)),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(vae_width, 4),
        sample_size=resolution,
        scaling_factor=0.5,
    )
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels * (2 if learned_sigma else 1),
        num_layers=layers,
        sample_size=resolution // down,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )
    # DiT's final layers are zero-initialised; give them random weights so outputs depend on inputs
    with torch.no_grad():
        for p in transformer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        clip_sample=False,
    )
    names = class_names or [f"class {i}" for i in range(num_classes)]
    id2label = {str(i): n for i, n in enumerate(names)}
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label).save_pretrained(path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["id2label"] = id2label  # the hub's DiT-XL-2-256 folder carries it in model_index.json
    index_file.write_text(json.dumps(index, indent=2))
    if transformer_class_name != "DiTTransformer2DModel":
        cfg_file = path / "transformer" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["_class_name"] = transformer_class_name
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return path
