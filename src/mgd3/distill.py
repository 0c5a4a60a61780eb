"""The `distill` driver: real data -> (encode -> modes) -> sampler -> distilled set on disk.

Items (class, index) are batched in a fixed class-major order; every image has its own
generator seeded from (seed, class id, index), so an image does not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import mgd3
from mgd3 import store
from mgd3.backends import Backend, default_device, load_backend
from mgd3.errors import Mgd3Error
from mgd3.methods import (ClassInfo, Context, Item, SamplerConfig, check_finite, get_method, item_seed,
                          option_flag)
from mgd3.sampling import UPDATE_RULES

log = logging.getLogger(__name__)

SHIPPED_MODELS = Path(__file__).parent / "models"


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
    max_real_per_class: int | None = None  # None: modes from every real image (official)
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False
    cache_dir: str | None = None
    progress: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    options: dict = field(default_factory=dict)  # method options by field name


def shipped_model(data: str) -> Path | None:
    """The model folder mgd3 ships for a named dataset (e.g. fashion-mnist), if any."""
    p = SHIPPED_MODELS / data
    return p if (p / "model_index.json").is_file() else None


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _synonyms(text: str) -> list[str]:
    """'tench, Tinca tinca' -> ['tench', 'tinca tinca']."""
    return [p.strip() for p in text.strip().lower().split(",") if p.strip()]


def map_labels(data, backend: Backend) -> list[int]:
    """The model label of every data class: from the data (subset tables, --class-map), else by
    name against the model's id2label (the full name first, then a synonym that names one label
    only), else by position when the model has no names and the same number of classes."""
    full = {text.strip().lower(): label for label, text in backend.id2label.items()}
    owners: dict[str, set[int]] = {}
    for label, text in backend.id2label.items():
        for n in _synonyms(text):
            owners.setdefault(n, set()).add(label)
    labels = []
    for c, cid in enumerate(data.class_ids):
        known = data.labels[c]
        for text in (data.class_names[c], cid):
            if known is not None:
                break
            known = full.get(text.strip().lower())
            if known is None:
                hits = {label for n in _synonyms(text) for label in owners.get(n, ())}
                known = hits.pop() if len(hits) == 1 else None
        if known is None and not backend.id2label and len(data.class_ids) == backend.num_classes:
            known = c
        if known is None:
            raise Mgd3Error(
                f"cannot tell which label of model {backend.path.name} class {cid!r} is (no name match in "
                "its id2label); pass --class-map FILE with lines 'CLASS_ID LABEL'")
        labels.append(int(known))
    return labels


def _validate(cfg: DistillConfig) -> None:
    if cfg.ipc < 1:
        raise Mgd3Error(f"--ipc must be at least 1, got {cfg.ipc}")
    if cfg.max_real_per_class is not None and cfg.max_real_per_class < cfg.ipc:
        raise Mgd3Error(f"--max-real-per-class ({cfg.max_real_per_class}) must be at least --ipc ({cfg.ipc})")
    if cfg.batch_size < 1 or cfg.encode_batch_size < 1:
        raise Mgd3Error("--batch-size must be at least 1")
    s = cfg.sampler
    UPDATE_RULES.get(s.sampler)
    if s.steps < 1:
        raise Mgd3Error(f"--steps must be at least 1, got {s.steps}")
    check_finite("--cfg", s.cfg)
    check_finite("--eta", s.eta)
    if s.cfg_channels is not None and s.cfg_channels < 1:
        raise Mgd3Error("--cfg-channels must be at least 1")


def distill(cfg: DistillConfig) -> dict:
    """Run one distillation; returns a summary (images, seconds, images/s, out)."""
    from mgd3.data import load_data

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    _validate(cfg)
    method_cls = get_method(cfg.method)
    options = _method_options(method_cls, cfg.options)

    model = cfg.model or shipped_model(cfg.data)
    if model is None:
        raise Mgd3Error(f"no --model given and mgd3 ships no model for {cfg.data!r}; pass --model PATH")
    device = default_device() if cfg.device == "auto" else cfg.device
    t = time.perf_counter()
    backend = load_backend(model, device=device, precision=cfg.precision)
    if cfg.sampler.cfg_channels is not None and cfg.sampler.cfg_channels > backend.latent_shape[0]:
        raise Mgd3Error(f"--cfg-channels {cfg.sampler.cfg_channels} > latent channels {backend.latent_shape[0]}")
    data = load_data(cfg.data, "train", resolution=backend.resolution, channels=backend.image_channels,
                     classes=cfg.classes, data_root=cfg.data_root, class_map=cfg.class_map)
    labels = map_labels(data, backend)
    classes = [ClassInfo(i, cid, data.class_names[i], labels[i]) for i, cid in enumerate(data.class_ids)]
    timing["load"] = time.perf_counter() - t

    ctx = Context(backend, data, classes, cfg.ipc, cfg.seed, cfg.sampler,
                  encode_batch_size=cfg.encode_batch_size, cache_dir=cfg.cache_dir, progress=cfg.progress,
                  max_real_per_class=cfg.max_real_per_class)
    method = method_cls(options) if method_cls.Options else method_cls()
    method.validate(ctx)
    out = store.prepare_out(cfg.out, cfg.overwrite)  # only after every check passed

    t = time.perf_counter()
    method.prepare(ctx)
    timing["prepare"] = time.perf_counter() - t

    items = [Item(c, k, item_seed(cfg.seed, c.class_id, k)) for c in classes for k in range(cfg.ipc)]
    batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    steps = cfg.sampler.steps if method_cls.generative else 1
    bar = tqdm(total=len(batches) * steps, desc=f"{cfg.method} ×{len(items)}", unit="step",
               disable=not cfg.progress)
    if method_cls.generative:
        ctx.observers = [lambda step: bar.update(1)]
    records, all_latents = [], []
    grid_rows: dict[str, list[np.ndarray]] = {}
    t_gen = t_dec = 0.0
    for batch_items in batches:
        t = time.perf_counter()
        result = method.generate(ctx, batch_items)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        images = result.images if result.images is not None else backend.decode(result.latents)
        paths = store.write_images(out, [it.cls.class_id for it in batch_items],
                                   [it.index for it in batch_items], images)
        t_dec += time.perf_counter() - t
        if not method_cls.generative:
            bar.update(1)
        if result.latents is not None:
            all_latents.append(result.latents.detach().float().cpu())
        u8 = store.to_uint8(images)
        mode_ids = result.mode_ids or [None] * len(batch_items)
        for j, (it, path) in enumerate(zip(batch_items, paths)):
            rec = {"path": path, "class_id": it.cls.class_id, "class_index": it.cls.index,
                   "label": it.cls.label, "index": it.index, "seed": it.seed, "mode_id": mode_ids[j]}
            if result.extra:
                rec.update(result.extra[j])
            records.append(rec)
            row = grid_rows.setdefault(it.cls.class_id, [])
            if len(row) < 10:
                row.append(u8[j])
    bar.close()
    timing["generate"] = t_gen
    timing["decode_write"] = t_dec

    store.write_grid(out / "grid.png", [np.stack(r) for r in grid_rows.values()])
    if all_latents:
        store.save_torch({"latents": torch.cat(all_latents), "paths": [r["path"] for r in records],
                          "labels": [r["label"] for r in records]}, out / "latents.pt")
    seconds = time.perf_counter() - t_start
    timing["total"] = seconds
    resolved = dataclasses.asdict(cfg)
    resolved.update(model=str(backend.path), device=str(backend.device))
    resolved["sampler"]["cfg"] = ctx.cfg_scale
    resolved["options"] = dataclasses.asdict(options) if options is not None else {}
    store.write_manifest(out, {
        "mgd3_version": mgd3.__version__,
        "git_commit": git_commit(),
        "method": cfg.method,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "data": {"name": cfg.data, "classes": cfg.classes, "data_root": cfg.data_root,
                 "resolution": data.resolution, "channels": data.channels, "fingerprint": data.fingerprint()},
        "model": {"path": str(backend.path), "backend": backend.name, "latent_shape": list(backend.latent_shape),
                  "learned_sigma": backend.learned_sigma},
        "classes": [{"class_id": c.class_id, "name": c.name, "class_index": c.index, "label": c.label}
                    for c in classes],
        "method_info": method.manifest_info(),
        "config": resolved,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "device": str(backend.device), "threads": torch.get_num_threads()},
        "images": records,
    })
    return {"out": str(out), "images": len(records), "classes": len(classes), "seconds": seconds,
            "images_per_s": len(records) / max(t_gen + t_dec, 1e-9), "timing": timing}


def _method_options(method_cls, given: dict):
    """Build the method's options dataclass; an option the method does not take is an error."""
    if method_cls.Options is None:
        if given:
            flags = ", ".join(sorted(_flag(k) for k in given))
            raise Mgd3Error(f"method {method_cls.name!r} takes no option {flags}")
        return None
    fields = {f.name: option_flag(f) for f in dataclasses.fields(method_cls.Options)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise Mgd3Error(f"method {method_cls.name!r} does not take {', '.join(_flag(u) for u in unknown)}; "
                        f"its options: {', '.join(sorted(fields.values()))}")
    return method_cls.Options(**given)


def _flag(field_name: str) -> str:
    """The CLI flag of a method option field, whichever method declares it."""
    from mgd3.methods import METHODS, load_methods

    for name in load_methods().names():
        opts = METHODS.get(name).Options
        for f in dataclasses.fields(opts) if opts else ():
            if f.name == field_name:
                return option_flag(f)
    return "--" + field_name.replace("_", "-")
