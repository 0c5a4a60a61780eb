"""What every backend shares: the `Backend` interface, the registry of backends by pipeline
class, and the readers of a model folder (`model_index.json`, `id2label`, `mgd3.json`, sizes).
The backends themselves (`dit`, `sd`, `unet`) build on this module; `mgd3.backends` loads them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mgd3 import safeio
from mgd3.backends.recommended import SAMPLER_RECOMMENDATIONS
from mgd3.config import default_device  # noqa: F401  (re-exported)
from mgd3.errors import Mgd3Error
from mgd3.files import read_json_object  # noqa: F401  (re-exported: every backend reads its configs with it)
from mgd3.registry import Registry
from mgd3.core.sampling import ModelOutput

log = logging.getLogger(__name__)


class Recommendation(NamedTuple):
    """What a model's mgd3.json recommends at one IPC (`Backend.defaults_at`)."""

    settings: dict[str, Any]  # cfg, steps and "methods": {method: {option: value}}
    ipc_range: list[int] | None  # the "by_ipc" entry's inclusive range; None when no entry applies


@dataclass
class Backend:
    """What every backend provides (subclasses fill it in)."""

    name: str
    path: Path  # the resolved local folder
    latent_shape: tuple[int, int, int]  # (C, h, w)
    image_channels: int
    resolution: int
    num_classes: int
    learned_sigma: bool
    betas: np.ndarray  # (T,) training betas, float64
    id2label: dict[int, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # recommended sampling settings
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def defaults_at(self, ipc: int, method: str | None = None) -> Recommendation:
        """The recommended settings for `ipc` (and `method`): the folder-wide ones, overridden by the
        mgd3.json "by_ipc" entry whose range holds `ipc` (cfg and steps replaced, method options
        merged per method); a "cfg" or "steps" among a method's options is that method's CFG scale
        or sampling steps and wins over the folder-wide one. Returns them and the entry's range
        (None when no entry applies)."""
        merged = {k: v for k, v in self.defaults.items() if k != "by_ipc"}
        methods = {m: dict(o) for m, o in (merged.get("methods") or {}).items()}
        ipc_range = None
        for entry in self.defaults.get("by_ipc") or ():
            low, high = entry["ipc"]
            if low <= ipc <= high:
                merged.update({k: v for k, v in entry.items() if k not in ("ipc", "methods", "evidence")})
                for m, opts in (entry.get("methods") or {}).items():
                    methods[m] = {**methods.get(m, {}), **opts}
                ipc_range = [low, high]
                break
        merged["methods"] = methods
        for key in SAMPLER_RECOMMENDATIONS:
            if method is not None and key in methods.get(method, {}):
                merged[key] = methods[method][key]
        return Recommendation(merged, ipc_range)

    # --- conditioning
    def cond(self, labels: list[int]) -> Tensor:
        raise NotImplementedError

    def uncond(self) -> Tensor:
        """The unconditional input for one item, (1, ...), broadcast by the CFG wrapper."""
        raise NotImplementedError

    def label_embedders(self) -> list[torch.nn.Module]:
        """Modules mapping class labels to embeddings (for semantic matching); [] if none."""
        return []

    # --- model
    def denoiser(self, x_t: Tensor, t: Tensor, cond: Tensor) -> ModelOutput:
        raise NotImplementedError

    # --- VAE
    def encode(self, images: Tensor) -> Tensor:
        """images (B, C, R, R) in [-1, 1] -> latents (B, c, h, w) = mean × scaling."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B, c, h, w) -> images (B, C, R, R) in [-1, 1]."""
        raise NotImplementedError

    # True when `decode_differentiable` exists (guidance through the decoder: IGD)
    decodes_with_gradients: ClassVar[bool] = False

    def decode_differentiable(self, latents: Tensor) -> Tensor:
        """`decode` with gradients flowing back to the latents, unclamped."""
        raise Mgd3Error(f"the {self.name} backend cannot decode with gradients")

    def vae_fingerprint(self) -> str:
        """Changes when the VAE weights or config change (encoding-cache key)."""
        raise NotImplementedError

    def autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


Loader = Callable[..., Backend]
BACKENDS: Registry[Loader] = Registry("backend")
# pipeline class in model_index.json -> backend name
PIPELINE_CLASSES: dict[str, str] = {}


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local folder, or a Hugging Face repo id found in the local cache (offline first)."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise Mgd3Error(f"model {str(model)!r} is a file; expected a diffusers pipeline folder")
        return p
    model = str(model)
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise Mgd3Error(f"model folder {model!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise Mgd3Error(
            f"model {model!r} is not a local folder and not in the Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
        )
    from mgd3.backends.hub import download

    try:
        return download(model)  # only the files the backend loads (one weight variant)
    except Exception as e:
        raise Mgd3Error(
            f"model {model!r} is not a local folder, not in the Hugging Face cache, and could "
            f"not be downloaded ({type(e).__name__})"
        ) from None


def read_model_index(path: Path) -> dict:
    f = path / "model_index.json"
    if not f.is_file():
        raise Mgd3Error(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    return read_json_object(f, "model_index")


def check_json_files(path: Path) -> None:
    """Read every JSON file of the folder's components (configs, scheduler and tokenizer files)
    once through the bounded reader, so what diffusers and transformers parse after it cannot
    hang, nest too deeply or hold an integer Python refuses to convert (one line instead)."""
    for f in sorted(path.glob("*/*.json")):
        if not f.name.startswith("."):
            safeio.read_json(f, 64 << 20, kind="model file")


def read_id2label(index: dict, where: Path) -> dict[int, str]:
    """model_index.json's id2label: {int label: name}; a key that is not an integer is an error."""
    raw = index.get("id2label") or {}
    if not isinstance(raw, dict):
        raise Mgd3Error(f"{where}/model_index.json: id2label must be a mapping of label: name")
    out = {}
    for k, v in raw.items():
        try:
            label = int(str(k).strip())
        except ValueError:
            raise Mgd3Error(f"{where}/model_index.json: id2label key {str(k)[:40]!r} is not an integer label") from None
        if label < 0 or not isinstance(v, str):
            raise Mgd3Error(f"{where}/model_index.json: id2label must map labels >= 0 to names, got {str(k)[:40]!r}: "
                            f"{str(v)[:40]!r}")
        out[label] = v
    return out


def read_recommendations(path: Path) -> dict:
    """The "defaults" of the folder's optional mgd3.json, checked as the CLI checks flags."""
    from mgd3.backends.recommended import check_recommended

    f = path / "mgd3.json"
    if not f.is_file():
        return {}
    return check_recommended(read_json_object(f, "mgd3.json").get("defaults"), str(f))


# sizes in diffusers model configs that must be positive integers (a list: each entry), checked
# before a network is built: `num_layers: -3` would build and then fail at the first forward
POSITIVE_SIZES = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                  "sample_size", "patch_size", "num_embeds_ada_norm", "latent_channels", "layers_per_block",
                  "block_out_channels", "norm_num_groups", "cross_attention_dim", "num_class_embeds",
                  "num_vq_embeddings", "vq_embed_dim", "transformer_layers_per_block")
MAX_SIZE = 1 << 20  # no size of a model mgd3 runs comes near this


def check_config_sizes(config_file: Path, cfg: dict) -> None:
    """Refuse a config whose sizes (POSITIVE_SIZES present in it) are not positive integers up to
    MAX_SIZE, naming the key, before anything is built."""
    for key in POSITIVE_SIZES:
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, (list, tuple)) and not v:
            raise Mgd3Error(f"{config_file}: {key} must not be empty")
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_SIZE:
                raise Mgd3Error(f"{config_file}: {key} must be a positive integer (at most {MAX_SIZE}), got "
                                f"{str(v)[:60]}")


def check_vae_channels(config_file: Path) -> None:
    """A VAE whose decoder gives back another number of channels than its encoder takes would
    write images of the wrong kind (RGBA PNGs from an RGB model): refused at load."""
    if not config_file.is_file():
        return
    cfg = read_json_object(config_file)
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if cin != cout:
        raise Mgd3Error(f"{config_file}: the VAE takes {cin} image channels but gives back {cout} "
                        "(in_channels must equal out_channels)")


def check_model_size(config_file: Path, estimate, what: str) -> None:
    """Estimate a model's parameters from its config (`estimate(config) -> int`) and refuse one
    whose float32 weights (and a copy while loading) do not fit in the available memory, before
    anything is allocated. Its sizes are checked first (`check_config_sizes`)."""
    from mgd3.config import check_memory

    if not config_file.is_file():
        return  # from_pretrained says what is missing
    cfg = read_json_object(config_file)
    check_config_sizes(config_file, cfg)
    try:
        n = int(estimate(cfg))
    except (TypeError, ValueError, KeyError, OverflowError, IndexError, ZeroDivisionError, AttributeError):
        return  # a config from_pretrained will reject with its own message
    if n > 50_000_000_000:
        raise Mgd3Error(f"{config_file}: the config describes a {what} of about {n / 1e9:.0f} B parameters; "
                        "that is not a model mgd3 can load")
    check_memory(n * 4 * 2, f"{config_file.parent} ({what}, about {n / 1e6:.0f} M parameters by its config)",
                 "it does not fit; use a machine with more memory")
