"""The settings of one `distill` run: `DistillConfig` (what the CLI, a YAML file and the Python
API fill), its rules, and every check that needs no data and no model — done before anything
loads. `check_distill_run` is the one check that needs the loaded model and the classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mgd3.config import (FINITE_NON_NEGATIVE, POSITIVE, RESOLUTION, SEED, STEPS, Rule, short, check_cache_dir,
                         check_device, check_image_memory, check_rules, check_types, convert, fill)
from mgd3.errors import Mgd3Error
from mgd3.methods import SamplerConfig

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"  # src/mgd3/models


@dataclass
class DistillConfig:
    data: str
    out: str
    model: str | None = None  # None: the model shipped with mgd3 for this data, if any
    method: str = "mgd3"
    ipc: int = 10
    seed: int = 0
    classes: list[str] | None = None
    data_root: str | None = None
    class_map: str | None = None
    batch_size: int = 32
    encode_batch_size: int = 64
    encode_workers: int | None = None  # DataLoader workers for encoding (None: 0 on CPU, else up to 16)
    max_real_per_class: int | None = None  # None: modes from every real image (official)
    select_from: int | None = None  # G > 1: keep IPC of G candidates per slot per class (mgd3.run.selection)
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False
    strict: bool = False  # an unreadable or missing image file in an image folder stops the run
    cache_dir: str | None = None
    use_cache: bool = True  # False (--no-cache): real images are encoded again and no encodings are written
    threads: int | None = None  # torch CPU threads (None: torch's default, every core)
    progress: bool = True
    # text-to-image backends (Stable Diffusion); None: the backend's default
    prompt: str | None = None  # template, {name} = the class name line ("{name}")
    negative_prompt: str | None = None  # the unconditional CFG branch ("")
    resolution: int | None = None  # generation resolution (None: the model's own)
    save_resolution: int | None = None  # images are resized to this when written (None: as generated)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    options: dict = field(default_factory=dict)  # method options by name (`lambda`, `t_stop` or field names)


def shipped_model(data: str) -> Path | None:
    """The model folder mgd3 ships for a named dataset (e.g. fashion-mnist), if any."""
    p = SHIPPED_MODELS / data
    return p if (p / "model_index.json").is_file() else None


def _method_names():
    from mgd3.methods import load_methods

    return load_methods().names()


def _sampler_names():
    from mgd3.core.sampling import UPDATE_RULES

    return UPDATE_RULES.names()


DISTILL_RULES: dict[str, Rule] = {
    "method": Rule(choices=_method_names, what="method"), "ipc": Rule(minimum=1, maximum=100_000), "seed": SEED,
    "batch_size": Rule(minimum=1, maximum=1_000_000), "encode_batch_size": Rule(minimum=1, maximum=1_000_000),
    "encode_workers": Rule(minimum=0, maximum=1024), "max_real_per_class": POSITIVE,
    "precision": Rule(choices=("fp32", "bf16", "fp16")), "resolution": RESOLUTION, "save_resolution": RESOLUTION,
    "threads": Rule(minimum=1, maximum=4096),
}
SAMPLER_RULES: dict[str, Rule] = {
    "sampler": Rule(choices=_sampler_names, what="sampler"), "steps": STEPS,
    "cfg": FINITE_NON_NEGATIVE, "cfg_channels": POSITIVE, "eta": FINITE_NON_NEGATIVE,
}



def distill_config(values: dict, source: str = "--config"):
    """A DistillConfig from merged YAML + flag values (flag names with underscores; method options
    by their flag name or field name); one-line errors for unknown keys and wrong types."""
    from mgd3.methods import SamplerConfig, check_method_options, method_option_fields, option_flag

    opt_fields = method_option_fields()
    by_flag = {option_flag(f).lstrip("-").replace("-", "_"): name for name, f in opt_fields.items()}
    sampler_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    top_skip = {"sampler", "options", "progress", "use_cache"}
    top_fields = {f.name for f in dataclasses.fields(DistillConfig)} - top_skip
    sampler, options, top = {}, {}, {}
    quiet = no_cache = False
    for k, v in values.items():
        if k.startswith("opt_"):
            options[k[4:]] = v
        elif k in by_flag or (k in opt_fields and k not in top_fields and k not in sampler_fields):
            options[by_flag.get(k, k)] = v
        elif k in sampler_fields:
            sampler[k] = v
        elif k in top_fields:
            top[k] = v
        elif k == "quiet":
            quiet = convert(k, v, "bool", source)
        elif k == "no_cache":
            no_cache = convert(k, v, "bool", source)
        else:
            known = sorted(top_fields | sampler_fields | set(by_flag) | {"quiet", "no_cache"})
            raise Mgd3Error(f"unknown option {k!r} in {source}; known: {', '.join(known)}")
    top = fill(DistillConfig, top, source, skip=top_skip)
    sampler = fill(SamplerConfig, sampler, source)
    options = check_method_options(options, source)
    for req in ("data", "out"):
        if req not in top:
            raise Mgd3Error(f"--{req} is required")
    # the rest of the checks (validate_distill) is the driver's first step, for the CLI and the API alike
    return DistillConfig(**top, progress=not quiet, use_cache=not no_cache, sampler=SamplerConfig(**sampler),
                         options=options)


def validate_distill(cfg) -> None:
    """Every check of a DistillConfig that needs no data and no model (the distill driver calls
    this first, so the Python API gets the same checks as the CLI)."""
    check_types(cfg, skip=("sampler", "options"))
    check_types(cfg.sampler)
    if not isinstance(cfg.options, dict):
        raise Mgd3Error(f"DistillConfig: options must be a mapping, got {short(cfg.options)}")
    for k in ("data", "out"):
        if not isinstance(getattr(cfg, k), str) or not getattr(cfg, k).strip():
            raise Mgd3Error(f"--{k} must be a non-empty string")
    check_rules(cfg, DISTILL_RULES)
    check_rules(cfg.sampler, SAMPLER_RULES)
    from mgd3.methods import check_method_options

    check_method_options(cfg.options)
    check_device(cfg.device)
    check_cache_dir(cfg.cache_dir)
    for k in ("model", "class_map", "data_root"):
        v = getattr(cfg, k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise Mgd3Error(f"--{k.replace('_', '-')} must be a non-empty string")
    if cfg.class_map is not None and not Path(cfg.class_map).expanduser().is_file():
        raise Mgd3Error(f"--class-map {cfg.class_map} is not a file")
    if cfg.save_resolution is not None:
        check_image_memory(cfg.batch_size, cfg.save_resolution, "--save-resolution")
    if cfg.resolution is not None:
        check_image_memory(cfg.batch_size, cfg.resolution, "--resolution")



def check_distill_run(cfg, backend, classes, cfg_scale: float) -> None:
    """Checks once the model is loaded and the classes are known, before the output folder is
    touched: every class label is one of the model's, the CFG scale (possibly from the model's
    mgd3.json) is a finite number >= 0, and a batch of generated images fits in memory."""
    if backend is None:  # no model (Method.needs): the images are the data's
        return
    n = int(getattr(backend, "num_classes", 0) or 0)
    if n > 0:
        bad = [c for c in classes if not 0 <= int(c.label) < n]
        if bad:
            raise Mgd3Error(f"class {bad[0].class_id!r} maps to label {bad[0].label}, outside the model's "
                            f"0..{n - 1} (check --class-map)")
    if cfg.sampler.cfg is None:  # the model's recommendation (mgd3.json), checked as --cfg is
        Rule(minimum=0.0).check(f"cfg recommended by {backend.path}/mgd3.json", float(cfg_scale))
    check_image_memory(cfg.batch_size, int(cfg.save_resolution or backend.resolution), "the image size")


# the sampler settings a model's mgd3.json may recommend: folder-wide, in a "by_ipc" entry, or among
