"""`mgd3 convert-ldm CKPT --config YAML --out DIR`: a CompVis latent-diffusion class-conditional
checkpoint (the `cin256-v2` layout of Rombach et al., CVPR 2022: `model.diffusion_model.*` UNet,
`cond_stage_model.embedding.weight` ClassEmbedder, `first_stage_model.*` VQ or KL autoencoder)
into mgd3's class-conditional LDM folder (`mgd3.backends.unet`), which `mgd3 distill --model DIR`
loads.

The UNet and the autoencoder are converted by diffusers' own utilities
(`diffusers.pipelines.stable_diffusion.convert_from_ckpt`: `create_unet_diffusers_config`,
`convert_ldm_unet_checkpoint`, `create_vae_diffusers_config`, `convert_ldm_vae_checkpoint`); the
VQ codebook and the class table are copied as they are. The YAML is the one CompVis ships next to
the checkpoint (`configs/latent-diffusion/cin256-v2.yaml`): the UNet from `unet_config`, the first
stage from `first_stage_config` (VQModelInterface or AutoencoderKL), the classes from
`cond_stage_config` (ClassEmbedder; its last row, index n_classes - 1, is the null class that
cin256-v2 was trained with for classifier-free guidance), the noise schedule from `linear_start`,
`linear_end` and `timesteps` (CompVis' "linear" schedule is diffusers' "scaled_linear"), the latent
scale from `scale_factor` (default 1.0).

Checkpoints are read with `torch.load(weights_only=True)` or safetensors, nothing else. Before any
conversion every key the YAML's UNet needs is looked up; a wrong or partial checkpoint is one line
naming the first missing key.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from mgd3 import safeio
from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
COND_KEY = "cond_stage_model.embedding.weight"
VAE_PREFIX = "first_stage_model."


# --------------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a .ckpt/.pt (torch.load, weights_only) or .safetensors file."""
    path = Path(path).expanduser()
    safeio.check_regular(path, f"checkpoint {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise Mgd3Error(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds: an unreadable or unsafe file
        first = safeio.load_error(e)
        raise Mgd3Error(f"{path} is not a checkpoint torch.load(weights_only=True) can read: {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Mgd3Error(f"{path} does not hold a state dict of tensors (or one under 'state_dict')")
    return obj


def load_config(path: str | Path) -> dict:
    path = Path(path).expanduser()
    cfg = safeio.read_yaml(path, 4 << 20, f"--config {path}", "latent-diffusion config")
    try:
        params = cfg["model"]["params"]
        for k in ("unet_config", "first_stage_config", "cond_stage_config"):
            params[k]["params"]
    except (KeyError, TypeError) as e:
        raise Mgd3Error(f"--config {path} is not a CompVis latent-diffusion config (no model.params.{e.args[0]} "
                        "... params)") from None
    return cfg


def _check_config(cfg: dict, source: str) -> None:
    p = cfg["model"]["params"]
    cond = p["cond_stage_config"]
    if not str(cond.get("target", "")).endswith("ClassEmbedder"):
        raise Mgd3Error(f"{source}: cond_stage_config is {cond.get('target')!r}; convert-ldm converts "
                        "class-conditional models (ClassEmbedder)")
    if p.get("conditioning_key", "crossattn") != "crossattn":
        raise Mgd3Error(f"{source}: conditioning_key {p.get('conditioning_key')!r}; the class-conditional LDM "
                        "cross-attends (crossattn)")
    if p.get("parameterization", "eps") != "eps":
        raise Mgd3Error(f"{source}: parameterization {p.get('parameterization')!r}; mgd3's LDM backend takes eps")
    u = p["unet_config"]["params"]
    if not u.get("use_spatial_transformer") or not u.get("context_dim"):
        raise Mgd3Error(f"{source}: the UNet has no spatial transformer with a context_dim")
    if u.get("num_classes") is not None:
        raise Mgd3Error(f"{source}: the UNet has its own num_classes embedding; only the cin256 design "
                        "(ClassEmbedder -> cross-attention) is converted")
    if u.get("use_linear_in_transformer") or u.get("disable_self_attentions"):
        raise Mgd3Error(f"{source}: linear-projection or cross-only transformers are not the cin256 layout")
    target = str(p["first_stage_config"].get("target", ""))
    if not target.endswith(("VQModelInterface", "VQModel", "AutoencoderKL")):
        raise Mgd3Error(f"{source}: first_stage_config is {target!r}; known: VQModelInterface, AutoencoderKL")
    _check_sizes(p, source)


# every size the conversion reads, (where, key, largest sane value); a list: each entry
_SIZES = [("unet_config", "model_channels", 4096), ("unet_config", "channel_mult", 16),
          ("unet_config", "num_res_blocks", 16), ("unet_config", "attention_resolutions", 1 << 10),
          ("unet_config", "in_channels", 64), ("unet_config", "out_channels", 64),
          ("unet_config", "transformer_depth", 64), ("unet_config", "context_dim", 1 << 14),
          ("ddconfig", "ch", 4096), ("ddconfig", "ch_mult", 16), ("ddconfig", "num_res_blocks", 16),
          ("ddconfig", "z_channels", 64), ("ddconfig", "resolution", 4096), ("ddconfig", "in_channels", 64),
          ("ddconfig", "out_ch", 64), ("first_stage_config", "embed_dim", 64)]
_OPTIONAL = {"transformer_depth", "out_channels", "in_channels", "out_ch", "ch", "num_res_blocks"}


def _check_sizes(p: dict, source: str) -> None:
    """Missing keys, wrong types and absurd sizes (`num_res_blocks: 1e9`, `channel_mult: 5`) are one
    line naming the key, before a network is built."""
    where = {"unet_config": p["unet_config"]["params"], "first_stage_config": p["first_stage_config"]["params"],
             "ddconfig": (p["first_stage_config"]["params"] or {}).get("ddconfig")}
    if not isinstance(where["ddconfig"], dict):
        raise Mgd3Error(f"{source}: first_stage_config.params.ddconfig must be a mapping")
    for part, key, top in _SIZES:
        d = where[part]
        if key not in d:
            if key in _OPTIONAL or part == "ddconfig" and key in ("ch", "num_res_blocks"):
                continue
            raise Mgd3Error(f"{source}: {part}.params has no {key}")
        v = d[key]
        items = v if isinstance(v, list) else [v]
        if key in ("channel_mult", "ch_mult", "attention_resolutions") and not isinstance(v, list):
            raise Mgd3Error(f"{source}: {part} {key} must be a list of integers, got {str(v)[:40]}")
        if not items and key != "attention_resolutions":
            raise Mgd3Error(f"{source}: {part} {key} must not be empty")
        for x in items:
            if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= top:
                raise Mgd3Error(f"{source}: {part} {key} must be a positive integer up to {top}, got {str(v)[:40]}")


# --------------------------------------------------------------------------- the keys the YAML needs


def _heads(u: dict, ch: int) -> int:
    """The openaimodel rule for the number of heads at width ch."""
    if u.get("num_head_channels", -1) not in (-1, None):
        return ch // u["num_head_channels"]
    return int(u["num_heads"])


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _res_keys(prefix: str, cin: int, cout: int) -> list[str]:
    """An openaimodel ResBlock's keys (a skip connection when the width changes)."""
    keys = [k for name in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
            for k in _wb(f"{prefix}.{name}")]
    return keys + (_wb(f"{prefix}.skip_connection") if cin != cout else [])


def _transformer_keys(prefix: str, u: dict) -> list[str]:
    """A SpatialTransformer's keys: `transformer_depth` blocks of self- and cross-attention."""
    keys = _wb(f"{prefix}.norm") + _wb(f"{prefix}.proj_in")
    for d in range(int(u.get("transformer_depth", 1))):
        b = f"{prefix}.transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            keys.extend(f"{b}.{attn}.to_{x}.weight" for x in "qkv")
            keys += _wb(f"{b}.{attn}.to_out.0")
            if attn == "attn1":
                keys += _wb(f"{b}.ff.net.0.proj") + _wb(f"{b}.ff.net.2")
        for n in ("norm1", "norm2", "norm3"):
            keys += _wb(f"{b}.{n}")
    return keys + _wb(f"{prefix}.proj_out")


def unet_keys(u: dict) -> list[str]:
    """Every state-dict key (without `model.diffusion_model.`) of the openaimodel UNetModel that the
    YAML's `unet_config.params` describe, in module order (spatial-transformer variant)."""
    mc, mults, nres = int(u["model_channels"]), list(u["channel_mult"]), int(u["num_res_blocks"])
    attn = set(u["attention_resolutions"])
    keys = _wb("time_embed.0") + _wb("time_embed.2") + _wb("input_blocks.0.0")
    chans, ch, ds, idx = [mc], mc, 1, 1
    for level, mult in enumerate(mults):
        for _ in range(nres):
            keys += _res_keys(f"input_blocks.{idx}.0", ch, mult * mc)
            ch = mult * mc
            if ds in attn:
                keys += _transformer_keys(f"input_blocks.{idx}.1", u)
            chans.append(ch)
            idx += 1
        if level != len(mults) - 1:
            keys += _wb(f"input_blocks.{idx}.0.op")
            chans.append(ch)
            ds, idx = ds * 2, idx + 1
    keys += _res_keys("middle_block.0", ch, ch) + _transformer_keys("middle_block.1", u)
    keys += _res_keys("middle_block.2", ch, ch)
    idx = 0
    for level, mult in list(enumerate(mults))[::-1]:
        for i in range(nres + 1):
            keys += _res_keys(f"output_blocks.{idx}.0", ch + chans.pop(), mc * mult)
            ch, j = mc * mult, 1
            if ds in attn:
                keys += _transformer_keys(f"output_blocks.{idx}.1", u)
                j = 2
            if level and i == nres:
                keys += _wb(f"output_blocks.{idx}.{j}.conv")
                ds //= 2
            idx += 1
    return keys + _wb("out.0") + _wb("out.2")


def _first_missing(state: dict, keys: list[str], source: str) -> None:
    for k in keys:
        if k not in state:
            raise Mgd3Error(f"{source} is not a checkpoint of this config: key {k!r} is missing")


# --------------------------------------------------------------------------- converting


def _quiet():
    from diffusers.utils import logging as dlog

    class _Q:
        def __enter__(self):
            self.level = dlog.get_verbosity()
            dlog.set_verbosity_error()
            self.w = warnings.catch_warnings()
            self.w.__enter__()
            warnings.simplefilter("ignore")

        def __exit__(self, *a):
            self.w.__exit__(*a)
            dlog.set_verbosity(self.level)

    return _Q()


def _strict_load(module, state: dict, what: str, source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise Mgd3Error(f"{source}: the checkpoint has no weights for {what} {missing[0]!r} (after conversion)")
    if unexpected:
        raise Mgd3Error(f"{source}: converted {what} weight {unexpected[0]!r} does not fit the YAML's model")


def convert_ldm(checkpoint: str | Path, config: str | Path, out: str | Path,
                id2label: dict[int, str] | None = None):
    """Convert; returns the written folder. `out` must not exist or be empty."""
    from diffusers import DDIMScheduler

    from mgd3.backends.unet import ClassEmbedder

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Mgd3Error(f"--out {out} exists and is not an empty folder")
    cfg = load_config(config)
    _check_config(cfg, str(config))
    source = str(checkpoint)
    state = load_checkpoint(checkpoint)
    p = cfg["model"]["params"]
    u = dict(p["unet_config"]["params"])
    fs = p["first_stage_config"]["params"]

    # every UNet key and the class table before anything is converted
    _first_missing(state, [UNET_PREFIX + k for k in unet_keys(u)] + [COND_KEY], source)
    table, n_classes, ctx = _class_table(state, p, u, id2label, source)
    unet, latent_size = _convert_unet(state, p, u, source)
    vae = _convert_vae(state, cfg, config, source)
    if unet.config.in_channels != int(fs["embed_dim"]):
        raise Mgd3Error(f"{config}: unet in_channels {unet.config.in_channels} != first stage embed_dim "
                        f"{fs['embed_dim']}")

    embedder = ClassEmbedder(num_classes=n_classes - 1, embed_dim=ctx)  # the last row is the null class
    with torch.no_grad():
        embedder.embedding_table.weight.copy_(table)
    scheduler = DDIMScheduler(num_train_timesteps=int(p.get("timesteps", 1000)),
                              beta_start=float(p.get("linear_start", 1e-4)), beta_end=float(p.get("linear_end", 2e-2)),
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    _write_folder(out, unet, embedder, vae, scheduler, id2label)
    log.info("converted %s (%d classes + null, latent %dx%dx%d) into %s", source, n_classes - 1,
             unet.config.in_channels, latent_size, latent_size, out)
    return out


def _class_table(state: dict, p: dict, u: dict, id2label: dict[int, str] | None, source: str):
    """The ClassEmbedder's table (n_classes, context_dim), checked against the YAML and --labels-from;
    returns (table, n_classes, context_dim). Its last row is the null class."""
    table = state[COND_KEY]
    ctx = u["context_dim"] if isinstance(u["context_dim"], int) else u["context_dim"][0]
    n_classes = int(p["cond_stage_config"]["params"].get("n_classes", table.shape[0]))
    if table.ndim != 2 or table.shape != (n_classes, ctx):
        raise Mgd3Error(f"{source}: {COND_KEY} has shape {tuple(table.shape)}, the config says "
                        f"({n_classes}, {ctx}) (n_classes x context_dim)")
    if n_classes < 2:
        raise Mgd3Error(f"{source}: n_classes {n_classes} leaves no class besides the null class")
    outside = sorted(k for k in (id2label or {}) if not 0 <= k < n_classes - 1)
    if outside:
        raise Mgd3Error(f"--labels-from names label {outside[0]}, but the checkpoint has {n_classes - 1} classes "
                        f"(0..{n_classes - 2}) and the null class")
    return table, n_classes, ctx


def _convert_unet(state: dict, p: dict, u: dict, source: str):
    """The UNet2DConditionModel of the YAML's `unet_config` with the checkpoint's converted weights;
    returns (unet, latent size). `u` is a copy of `unet_config.params` (its num_heads may be cleared)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config,
    )

    dd = p["first_stage_config"]["params"]["ddconfig"]
    down = 2 ** (len(dd["ch_mult"]) - 1)
    latent_size = int(u.get("image_size") or p.get("image_size"))
    if u.get("num_head_channels", -1) not in (-1, None):  # heads per level from the head width
        u["num_heads"] = None
    unet_cfg = create_unet_diffusers_config({"model": {"params": {**p, "unet_config": {"params": u}}}},
                                            image_size=latent_size * down)
    if unet_cfg["attention_head_dim"] is None:
        unet_cfg["attention_head_dim"] = [_heads(p["unet_config"]["params"], int(u["model_channels"]) * m)
                                          for m in u["channel_mult"]]
    try:
        with _quiet():
            unet_sd = convert_ldm_unet_checkpoint(dict(state), unet_cfg)
            unet = UNet2DConditionModel(**unet_cfg)
    except KeyError as e:
        raise Mgd3Error(f"{source} is not a checkpoint of this config: key {UNET_PREFIX}{e.args[0]!r} is missing") \
            from None
    _strict_load(unet, unet_sd, "unet", source)
    return unet, latent_size


def _convert_vae(state: dict, cfg: dict, config: str | Path, source: str):
    """The first stage: a VQModel (its codebook copied) or an AutoencoderKL, with the checkpoint's
    converted weights and the YAML's `scale_factor` (default 1.0)."""
    from diffusers import AutoencoderKL, VQModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config,
    )

    p = cfg["model"]["params"]
    fs = p["first_stage_config"]["params"]
    dd = fs["ddconfig"]
    vq = not str(p["first_stage_config"]["target"]).endswith("AutoencoderKL")
    vae_cfg = create_vae_diffusers_config(cfg, image_size=int(dd["resolution"]))
    try:
        with _quiet():
            vae_sd = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(VAE_PREFIX)},
                                                vae_cfg)
    except KeyError as e:
        raise Mgd3Error(f"{source} is not a checkpoint of this config: key '{VAE_PREFIX}{e.args[0]}' is missing") \
            from None
    scale = float(p.get("scale_factor", 1.0))
    if vq:
        code = VAE_PREFIX + "quantize.embedding.weight"
        _first_missing(state, [code], source)
        vae_sd["quantize.embedding.weight"] = state[code]
        with _quiet():
            vae = VQModel(**vae_cfg, num_vq_embeddings=int(fs["n_embed"]), vq_embed_dim=int(fs["embed_dim"]),
                          scaling_factor=scale)
    else:
        if int(fs["embed_dim"]) != int(dd["z_channels"]):
            raise Mgd3Error(f"{config}: AutoencoderKL embed_dim {fs['embed_dim']} != z_channels {dd['z_channels']}")
        with _quiet():
            vae = AutoencoderKL(**vae_cfg, scaling_factor=scale)
    _strict_load(vae, vae_sd, "vae", source)
    return vae


def _write_folder(out: Path, unet, embedder, vae, scheduler, id2label: dict[int, str] | None) -> None:
    """Write beside the target, then move into place: an interrupted conversion leaves no half folder."""
    from mgd3.backends.unet import save_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_pipeline(tmp, unet, embedder, vae, scheduler, id2label)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-ldm", help="convert a CompVis class-conditional latent-diffusion checkpoint (cin256-v2)",
        description="Convert a CompVis latent-diffusion class-conditional checkpoint (model.diffusion_model.*, "
                    "cond_stage_model.*, first_stage_model.* keys; e.g. cin256-v2) with its YAML config into "
                    "mgd3's class-conditional LDM folder (unet/, class_embedder/, vae/, scheduler/), for "
                    "mgd3 distill --model OUT.")
    p.add_argument("checkpoint", metavar="CKPT", help=".ckpt/.pt (read with torch.load weights_only) or .safetensors")
    p.add_argument("--config", required=True, metavar="YAML", help="the CompVis config of the checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--labels-from", metavar="MODEL_DIR",
                   help="copy id2label from this pipeline folder's model_index.json (e.g. a DiT-XL-2-256 folder "
                        "for the 1000 ImageNet class names)")
    p.set_defaults(func=run)


def run(args) -> int:
    id2label = None
    if args.labels_from:
        from mgd3.backends import read_model_index

        index = read_model_index(Path(args.labels_from).expanduser())
        raw = index.get("id2label")
        if not isinstance(raw, dict) or not raw:
            raise Mgd3Error(f"--labels-from {args.labels_from}: its model_index.json has no id2label")
        try:
            id2label = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise Mgd3Error(f"--labels-from {args.labels_from}: id2label keys must be integers") from None
    out = convert_ldm(args.checkpoint, args.config, args.out, id2label=id2label)
    print(f"wrote {out}; use it with: mgd3 distill --model {out} --data ...")
    return 0
