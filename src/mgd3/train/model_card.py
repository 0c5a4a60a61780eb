"""MODEL_CARD.md of a `mgd3 pretrain` folder: the data, the commands, the epochs and wall time of
each stage, the final losses, the VAE's PSNR and, after --quality, the quality numbers."""

from __future__ import annotations

from pathlib import Path

import torch

from mgd3.machine import cpu_name
from mgd3.train.pretrain_settings import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, PretrainConfig, dit_size


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
