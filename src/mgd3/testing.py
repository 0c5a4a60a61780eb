"""Tiny real diffusers models for tests and speed benchmarks (no weights to download).

`build_dit_folder` writes a class-conditional DiT pipeline in exactly the layout of
`facebook/DiT-XL-2-256` (model_index.json with id2label, transformer/, vae/, scheduler/),
with real diffusers modules built under a fixed seed and saved with `save_pretrained`.
`build_sd_folder` does the same for a text-to-image StableDiffusionPipeline in the layout of
`stable-diffusion-v1-5` (unet/, vae/, text_encoder/, tokenizer/ with vocab.json + merges.txt,
scheduler/). `build_ldm_folder` writes mgd3's class-conditional LDM layout (`mgd3.backends.unet`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _tiny_vae(channels: int, width: int, levels: int, latent_channels: int, resolution: int):
    """A small AutoencoderKL: `levels` blocks of widths width, 2·width, ... (downsampling 2^(levels-1))."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(width * (i + 1) for i in range(levels)),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(width, 4),
        sample_size=resolution,
        scaling_factor=0.5,
    )


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
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    path = Path(path)
    down = 2 ** (vae_levels - 1)
    if resolution % down:
        raise ValueError("resolution must be divisible by the VAE downsampling factor")
    torch.manual_seed(seed)
    vae = _tiny_vae(image_channels, vae_width, vae_levels, latent_channels, resolution)
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


def _write_clip_tokenizer(folder: Path, max_length: int) -> None:
    """A character-level CLIP BPE tokenizer in the hub layout (vocab.json, merges.txt, configs).

    Every printable ASCII character, alone and as a word end ("a</w>"), and no merges: each
    word is spelled out. Special tokens last, as in CLIP's own vocabulary.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():  # save_pretrained may have written other formats (tokenizer.json)
        f.unlink()
    chars = [chr(b) for b in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special}, indent=2))


def build_sd_folder(
    path: str | Path,
    *,
    resolution: int = 16,
    latent_channels: int = 4,
    vae_levels: int = 2,
    widths: tuple[int, ...] = (8, 16),
    text_dim: int = 16,
    text_layers: int = 2,
    max_length: int = 32,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Build and save a tiny Stable Diffusion (text-to-image) pipeline; returns the folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    down = 2 ** (vae_levels - 1)
    if resolution % down:
        raise ValueError("resolution must be divisible by the VAE downsampling factor")
    _write_clip_tokenizer(path / "tokenizer", max_length)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    torch.manual_seed(seed)
    vae = _tiny_vae(3, widths[0], vae_levels, latent_channels, resolution)
    unet = UNet2DConditionModel(
        sample_size=resolution // down,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        block_out_channels=widths,
        layers_per_block=1,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=min(widths[0], 4),
    )
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers,
        num_attention_heads=2, max_position_embeddings=max_length, pad_token_id=eos, eos_token_id=eos,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
    ))
    # the SD v1.5 scheduler config (PNDM, scaled_linear betas); mgd3 reads only its betas and prediction type
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    from mgd3.backends.sd import _quiet_transformers

    with _quiet_transformers():
        pipe.save_pretrained(path)
    _write_clip_tokenizer(path / "tokenizer", max_length)  # the hub's files, not the converted tokenizer.json
    return path


def build_ldm_folder(
    path: str | Path,
    *,
    num_classes: int = 10,
    image_channels: int = 3,
    resolution: int = 16,
    latent_channels: int = 4,
    vae_levels: int = 2,
    vae_width: int = 8,
    widths: tuple[int, ...] = (8, 16),
    embed_dim: int = 16,
    first_stage: str = "kl",
    learned_sigma: bool = False,
    class_names: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build and save a tiny class-conditional LDM (mgd3's LDMClassConditionalPipeline layout:
    unet/, class_embedder/, vae/ (AutoencoderKL or, with first_stage="vq", VQModel), scheduler/)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

    from mgd3.backends.unet import ClassEmbedder, save_pipeline

    path = Path(path)
    down = 2 ** (vae_levels - 1)
    if resolution % down:
        raise ValueError("resolution must be divisible by the VAE downsampling factor")
    torch.manual_seed(seed)
    if first_stage == "vq":
        vae = VQModel(in_channels=image_channels, out_channels=image_channels,
                      down_block_types=("DownEncoderBlock2D",) * vae_levels,
                      up_block_types=("UpDecoderBlock2D",) * vae_levels,
                      block_out_channels=tuple(vae_width * (i + 1) for i in range(vae_levels)),
                      layers_per_block=1, latent_channels=latent_channels, num_vq_embeddings=32,
                      norm_num_groups=min(vae_width, 4), sample_size=resolution, scaling_factor=1.0)
    else:
        vae = _tiny_vae(image_channels, vae_width, vae_levels, latent_channels, resolution)
    unet = UNet2DConditionModel(
        sample_size=resolution // down, in_channels=latent_channels,
        out_channels=latent_channels * (2 if learned_sigma else 1),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        block_out_channels=widths, layers_per_block=1, cross_attention_dim=embed_dim,
        attention_head_dim=2, norm_num_groups=min(widths[0], 4),
    )
    embedder = ClassEmbedder(num_classes=num_classes, embed_dim=embed_dim)
    # the LDM paper's linear schedule (linspace of square roots), as CompVis cin256-v2
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                              beta_schedule="scaled_linear", clip_sample=False)
    names = class_names or [f"class {i}" for i in range(num_classes)]
    return save_pipeline(path, unet, embedder, vae, scheduler, dict(enumerate(names)))
