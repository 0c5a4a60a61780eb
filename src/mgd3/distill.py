"""The `distill` driver: real data -> (encode -> modes) -> sampler -> distilled set on disk.

Every image has its own generator seeded from (seed, class id, index). Items are batched per
class (a batch never mixes classes: batched matmuls round differently with the batch's make-up,
so fixed per-class batches make an image independent of how classes are shared out between
processes and of which batches an interrupted run had finished).

Several processes (`torchrun --nproc_per_node N -m mgd3 distill ...`): rank r distills classes
r, r+N, ... and writes their images; rank 0 gathers the records and writes latents.pt, grid.png
and, last, manifest.json. The set is the one a single process writes (with the same threads per
process on a CPU). Resuming: OUT/.mgd3-run.json holds the settings that determine the images, and
every finished batch leaves a shard in OUT/.partial/; a re-run with the same settings generates
the missing batches only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import mgd3
from mgd3 import store
from mgd3.allocator import keep_freed_memory
from mgd3.backends import Backend, default_device, load_backend
from mgd3.errors import Mgd3Error
from mgd3.methods import (ClassInfo, Context, Item, SamplerConfig, check_finite, get_method, item_seed,
                          option_flag)
from mgd3.profile import StageProfile
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
    encode_workers: int | None = None  # DataLoader workers for encoding (None: 0 on CPU, else up to 16)
    max_real_per_class: int | None = None  # None: modes from every real image (official)
    device: str = "auto"
    precision: str = "fp32"
    overwrite: bool = False
    strict: bool = False  # an unreadable or missing image file in an image folder stops the run
    cache_dir: str | None = None
    progress: bool = True
    # [text-to-image] Stable Diffusion and other text-conditional backends; None: the backend's default
    prompt: str | None = None  # template, {name} = the class name line ("{name}")
    negative_prompt: str | None = None  # the unconditional CFG branch ("")
    resolution: int | None = None  # generation resolution (None: the model's own)
    save_resolution: int | None = None  # images are resized to this when written (None: as generated)
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


# --- [text-to-image] begin: hooks for text-conditional backends (Stable Diffusion)


def _set_resolution(backend: Backend, cfg: DistillConfig) -> None:
    """--resolution: a backend that can generate at other sizes (`set_resolution`) is told;
    any other must already generate at that size. --save-resolution is checked here, early."""
    if cfg.save_resolution is not None and cfg.save_resolution < 1:
        raise Mgd3Error(f"--save-resolution must be at least 1, got {cfg.save_resolution}")
    if cfg.resolution is None or cfg.resolution == backend.resolution:
        return
    if not callable(getattr(backend, "set_resolution", None)):
        raise Mgd3Error(f"--resolution {cfg.resolution}: model {backend.path.name} ({backend.name}) "
                        f"generates at {backend.resolution} px only")
    backend.set_resolution(cfg.resolution)


def class_labels(data, backend: Backend, cfg: DistillConfig) -> list[int]:
    """A text-conditional backend (`set_classes`) takes the data's class names as its classes
    (label i = class i, prompted by its name); a class-conditional one maps names to its labels."""
    if callable(getattr(backend, "set_classes", None)):
        return backend.set_classes(list(data.class_names), prompt=cfg.prompt, negative_prompt=cfg.negative_prompt)
    if cfg.prompt is not None or cfg.negative_prompt is not None:
        raise Mgd3Error(f"--prompt and --negative-prompt need a text-to-image model; {backend.path.name} "
                        f"({backend.name}) is class-conditional")
    return map_labels(data, backend)


def resize_for_saving(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """(B, C, R, R) in [-1, 1] -> (B, C, resolution, resolution), bicubic with antialiasing."""
    if resolution is None or images.shape[-1] == resolution:
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(resolution, resolution), mode="bicubic",
                                          antialias=True, align_corners=False)
    return out.clamp(-1.0, 1.0)


# --- [text-to-image] end


def _validate(cfg: DistillConfig) -> None:
    if cfg.ipc < 1:
        raise Mgd3Error(f"--ipc must be at least 1, got {cfg.ipc}")
    if cfg.max_real_per_class is not None and cfg.max_real_per_class < cfg.ipc:
        raise Mgd3Error(f"--max-real-per-class ({cfg.max_real_per_class}) must be at least --ipc ({cfg.ipc})")
    if cfg.batch_size < 1 or cfg.encode_batch_size < 1:
        raise Mgd3Error("--batch-size must be at least 1")
    if cfg.encode_workers is not None and cfg.encode_workers < 0:
        raise Mgd3Error(f"--encode-workers must be at least 0, got {cfg.encode_workers}")
    s = cfg.sampler
    UPDATE_RULES.get(s.sampler)
    if s.steps < 1:
        raise Mgd3Error(f"--steps must be at least 1, got {s.steps}")
    check_finite("--cfg", s.cfg)
    check_finite("--eta", s.eta)
    if s.cfg_channels is not None and s.cfg_channels < 1:
        raise Mgd3Error("--cfg-channels must be at least 1")


GRID_PER_CLASS = 10  # images per class row in grid.png

# DistillConfig fields that do not change an image: where the set goes, how progress shows,
# where it runs (a CPU and a GPU round differently, but moving a run is the user's call), how
# real images are batched and cached; data, model and classes enter the key resolved (below).
# Any other field, including ones added later, is part of the run key.
NOT_IN_RUN_KEY = ("out", "overwrite", "progress", "device", "cache_dir", "batch_size", "encode_batch_size",
                  "encode_workers", "strict", "data", "data_root", "class_map", "model", "classes")


def model_fingerprint(path: Path) -> str:
    """Changes when a file of the model folder changes (names, sizes, first and last MiB)."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix != ".md"
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}|{size}\n".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def run_key(cfg: DistillConfig, backend: Backend, data, classes: list[ClassInfo], ctx: Context, options,
            method) -> dict:
    """The resolved settings that determine the images (OUT/.mgd3-run.json): a re-run with the
    same key resumes, another key is refused. Batch size is not in it (an image has its own
    generator), except for methods whose images depend on earlier batches (`order_dependent`)."""
    key: dict = {"mgd3_version": mgd3.__version__, "method": cfg.method, "ipc": cfg.ipc, "seed": cfg.seed,
                 "data": {"fingerprint": data.fingerprint(), "resolution": data.resolution,
                          "channels": data.channels},
                 "classes": [[c.class_id, c.label] for c in classes],
                 "model": {"backend": backend.name, "fingerprint": model_fingerprint(backend.path),
                           "latent_shape": list(backend.latent_shape)}}
    for k, v in dataclasses.asdict(cfg).items():
        if k not in NOT_IN_RUN_KEY and k not in key:
            key[k] = v
    key["sampler"]["cfg"] = ctx.cfg_scale
    key["options"] = dataclasses.asdict(options) if options is not None else {}
    if method.order_dependent:
        key["batch_size"] = cfg.batch_size
    return key


def _warn_resume_differences(out: Path, info: dict) -> None:
    before = (store.read_run(out) or {}).get("info", {})
    for name, flag in (("batch_size", "--batch-size"), ("device", "--device")):
        if name in before and before[name] != info[name]:
            log.warning("resuming %s with %s %s (it was started with %s): the remaining images can differ "
                        "from an uninterrupted run in the last float bits", out, flag, info[name], before[name])


def _plan(classes: list[ClassInfo], cfg: DistillConfig, out: Path, resume: bool, order_dependent: bool):
    """The work of this process, class by class in index order: (shard, None) for a batch an
    interrupted run finished, (None, items) for a batch to generate. Missing items of a class are
    batched in runs of batch_size from where they start, which reproduces the original batches.
    For an order-dependent method everything after the first missing item is generated again."""
    work, resumed = [], 0
    for c in classes:
        shards = store.load_shards(out, c.index, c.class_id) if resume else {}
        todo: list[Item] = []
        k = 0
        while k < cfg.ipc:
            shard = shards.get(k)
            if shard is not None and not (order_dependent and todo) and shard["indices"][-1] < cfg.ipc:
                work += [(None, todo[i:i + cfg.batch_size]) for i in range(0, len(todo), cfg.batch_size)]
                todo = []
                shard["cls"] = c
                work.append((shard, None))
                resumed += len(shard["indices"])
                k += len(shard["indices"])
            else:
                todo.append(Item(c, k, item_seed(cfg.seed, c.class_id, k)))
                k += 1
        work += [(None, todo[i:i + cfg.batch_size]) for i in range(0, len(todo), cfg.batch_size)]
    if resumed:
        log.info("resuming: %d images kept from an interrupted run", resumed)
    return work, resumed


def _merge_info(infos: list[dict]):
    """The method_info of several processes (each knows its own classes) as one: dicts are
    merged key by key; a dict keyed by class indices comes out in class order."""
    first = infos[0]
    if not all(isinstance(i, dict) for i in infos):
        return first
    keys = list(dict.fromkeys(k for i in infos for k in i))
    if keys and all(isinstance(k, str) and k.isdigit() for k in keys):
        keys.sort(key=int)
    return {k: _merge_info([i[k] for i in infos if k in i]) for k in keys}


class PeerFailed(Mgd3Error):
    """Another process of the launch failed (it reports the error; this one exits quietly)."""

    reported = True


class Ranks:
    """The processes of one torchrun launch (WORLD_SIZE, RANK, LOCAL_RANK in the environment), or
    a single process when WORLD_SIZE is absent or 1 (then torch.distributed is not touched).

    The process group (gloo: it carries only records and a few latents, CPU tensors, so it works
    the same with CUDA devices) gathers the results at the end. Failing fast goes through the
    rendezvous store: the first process to fail records its error there (compare-and-set, so one
    error line is reported, by that process); every other process checks the store after each
    batch and while it waits, and stops with a non-zero exit. A process that dies outright is
    torchrun's to notice: it stops the others."""

    POLL_S = 0.05

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, store=None):
        self.rank, self.world, self.local_rank, self.store = rank, world, local_rank, store

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        try:
            base, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=10)))
            dist.init_process_group("gloo", store=base, rank=rank, world_size=world,
                                    timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise Mgd3Error(f"cannot join the torchrun process group: {first}") from None
        if rank > 0:  # progress and info lines come from rank 0 only
            logging.getLogger("mgd3").setLevel(logging.WARNING)
        local = int(os.environ.get("LOCAL_RANK") or 0)
        return cls(rank, world, local, dist.PrefixStore("mgd3/", base))

    def close(self) -> None:
        if self.store is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.store = None

    def abort(self, e: BaseException) -> None:
        """Record this process's failure; the first failure of the launch is the one reported."""
        if self.store is None or isinstance(e, PeerFailed):
            return
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = text if isinstance(e, Mgd3Error) else f"{type(e).__name__}{': ' + text if text else ''}"
        payload = f"{self.rank}\n{msg}"
        try:
            first = self.store.compare_set("failed", "", payload) == payload.encode()
        except Exception:  # the store is gone: torchrun is tearing the launch down
            return
        if isinstance(e, Mgd3Error):
            if first:  # said here, before the others may exit and torchrun stops this process
                log.error("error: %s", msg)
            e.reported = True
        if first:
            self.store.set("reported", "1")

    def check(self) -> None:
        """Raise PeerFailed when another process of the launch failed."""
        if self.store is not None and self.store.check(["failed"]):
            rank, _, msg = self.store.get("failed").decode().partition("\n")
            deadline = time.monotonic() + 10  # let the failing process say why first
            while not self.store.check(["reported"]) and time.monotonic() < deadline:
                time.sleep(self.POLL_S)
            raise PeerFailed(f"process {rank} failed: {msg}")

    def wait_all(self, name: str) -> None:
        """A barrier that stops early when a process fails (and never times out on slow peers)."""
        if self.store is None:
            return
        self.store.set(f"{name}/{self.rank}", "1")
        keys = [f"{name}/{r}" for r in range(self.world)]
        while not self.store.check(keys):
            self.check()
            time.sleep(self.POLL_S)

    def share(self, name: str, value=None):
        """Rank 0's `value` (JSON) for every process; the others wait for it."""
        if self.store is None:
            return value
        if self.rank == 0:
            self.store.set(name, json.dumps(value))
            return value
        while not self.store.check([name]):
            self.check()
            time.sleep(self.POLL_S)
        return json.loads(self.store.get(name))

    def gather(self, obj) -> list | None:
        """Every process's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.store is None:
            return [obj]
        import torch.distributed as dist

        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts


def distill(cfg: DistillConfig) -> dict:
    """Run one distillation; returns a summary (images, seconds, images/s, out; `complete` when
    the folder already held this set, `resumed` images kept from an interrupted run, and `rank`).
    Under torchrun every process calls this; see `Ranks`."""
    ranks = Ranks.from_env()
    try:
        return _distill(cfg, ranks)
    except BaseException as e:
        ranks.abort(e)
        raise
    finally:
        ranks.close()


def _distill(cfg: DistillConfig, ranks: "Ranks") -> dict:
    from mgd3.data import load_data

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    keep_freed_memory()  # no page-fault churn in the sampling loop (allocator.py)
    _validate(cfg)
    method_cls = get_method(cfg.method)
    options = _method_options(method_cls, cfg.options)

    model = cfg.model or shipped_model(cfg.data)
    if model is None:
        raise Mgd3Error(f"no --model given and mgd3 ships no model for {cfg.data!r}; pass --model PATH")
    device = default_device() if cfg.device == "auto" else cfg.device
    if ranks.world > 1 and device == "cuda":
        device = f"cuda:{ranks.local_rank}"  # one GPU per process of the node
    progress = cfg.progress and ranks.rank == 0
    t = time.perf_counter()
    backend = load_backend(model, device=device, precision=cfg.precision)
    prof = StageProfile.attach(backend)  # work per stage: forwards, FLOPs (profile.py)
    recommended = _recommended_options(backend, method_cls)
    if recommended:  # what the user gave wins over what the model recommends
        options = _method_options(method_cls, {**recommended, **cfg.options})
        used = {k: v for k, v in recommended.items() if k not in cfg.options}
        if used:
            log.info("%s options recommended by %s/mgd3.json: %s", cfg.method, backend.path,
                     ", ".join(f"{_flag(k)} {v}" for k, v in used.items()))
    _set_resolution(backend, cfg)  # [text-to-image]
    if cfg.sampler.cfg_channels is not None and cfg.sampler.cfg_channels > backend.latent_shape[0]:
        raise Mgd3Error(f"--cfg-channels {cfg.sampler.cfg_channels} > latent channels {backend.latent_shape[0]}")
    data = load_data(cfg.data, "train", resolution=backend.resolution, channels=backend.image_channels,
                     classes=cfg.classes, data_root=cfg.data_root, class_map=cfg.class_map,
                     bad_files="strict" if cfg.strict else "skip")
    labels = class_labels(data, backend, cfg)  # [text-to-image] was: map_labels(data, backend)
    classes = [ClassInfo(i, cid, data.class_names[i], labels[i]) for i, cid in enumerate(data.class_ids)]
    timing["load"] = time.perf_counter() - t

    ctx = Context(backend, data, classes, cfg.ipc, cfg.seed, cfg.sampler,
                  encode_batch_size=cfg.encode_batch_size, encode_workers=cfg.encode_workers,
                  cache_dir=cfg.cache_dir, progress=progress, max_real_per_class=cfg.max_real_per_class)
    method = method_cls(options) if method_cls.Options else method_cls()
    method.validate(ctx)
    key = run_key(cfg, backend, data, classes, ctx, options, method)
    state = None
    if ranks.rank == 0:  # only after every check passed
        info = {"batch_size": cfg.batch_size, "encode_batch_size": cfg.encode_batch_size,
                "device": str(backend.device), "processes": ranks.world}
        out, state = store.open_run(cfg.out, cfg.overwrite, key, info)
        if state == "resume":
            _warn_resume_differences(out, info)
    state = ranks.share("open", state)
    out = Path(cfg.out).expanduser()
    if state == "complete":
        n = len(store.read_manifest(out).get("images", []))
        log.info("%s already holds the complete set for these settings; nothing to do", out)
        return {"out": str(out), "images": n, "classes": len(classes), "seconds": time.perf_counter() - t_start,
                "images_per_s": 0.0, "timing": timing, "complete": True, "resumed": n, "rank": ranks.rank}

    # this process's classes: r, r+N, ... (ctx.all_classes keeps every class of the run)
    ctx.classes = [c for c in classes if c.index % ranks.world == ranks.rank]
    t = time.perf_counter()
    prof.enter("prepare")
    method.prepare(ctx)  # deterministic (and encodings are cached), so also run on resume
    timing["prepare"] = time.perf_counter() - t

    work, resumed = _plan(ctx.classes, cfg, out, state == "resume", method.order_dependent)
    steps = cfg.sampler.steps if method_cls.generative else 1
    todo = [items for _, items in work if items is not None]
    bar = tqdm(total=len(todo) * steps, desc=f"{cfg.method} ×{sum(map(len, todo))}", unit="step",
               disable=not progress)
    if method_cls.generative:
        ctx.observers = [lambda step: bar.update(1)]
    per_class: dict[int, dict] = {}  # class index -> {"records", "latents", "grid"}
    t_gen = t_dec = 0.0
    for shard, batch_items in work:
        ranks.check()  # stop soon when another process failed
        if shard is not None:  # finished by an interrupted run
            cls = shard["cls"]
            entry = per_class.setdefault(cls.index, {"records": [], "latents": [], "grid": {}})
            entry["records"] += shard["records"]
            if shard["latents"] is not None:
                entry["latents"].append(shard["latents"])
                method.replay(ctx, [Item(cls, k, item_seed(cfg.seed, cls.class_id, k)) for k in shard["indices"]],
                              shard["latents"])
            entry["grid"].update(shard["grid"])
            continue
        t = time.perf_counter()
        prof.enter("generate", images=len(batch_items))
        result = method.generate(ctx, batch_items)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        prof.enter("decode_write", images=len(batch_items))
        images = result.images if result.images is not None else backend.decode(result.latents)
        images = resize_for_saving(images, cfg.save_resolution)  # [text-to-image] no-op when None
        paths = store.write_images(out, [it.cls.class_id for it in batch_items],
                                   [it.index for it in batch_items], images)
        t_dec += time.perf_counter() - t
        if not method_cls.generative:
            bar.update(1)
        latents = result.latents.detach().cpu() if result.latents is not None else None
        u8 = store.to_uint8(images)
        mode_ids = result.mode_ids or [None] * len(batch_items)
        records, grid = [], {}
        for j, (it, path) in enumerate(zip(batch_items, paths)):
            rec = {"path": path, "class_id": it.cls.class_id, "class_index": it.cls.index,
                   "label": it.cls.label, "index": it.index, "seed": it.seed, "mode_id": mode_ids[j]}
            if result.extra:
                rec.update(result.extra[j])
            records.append(rec)
            if it.index < GRID_PER_CLASS:
                grid[it.index] = torch.from_numpy(np.ascontiguousarray(u8[j]))
        cls = batch_items[0].cls
        store.save_shard(out, cls.index, batch_items[0].index,
                         {"indices": [it.index for it in batch_items], "latents": latents,
                          "records": records, "grid": grid})  # after its images: the batch is done
        entry = per_class.setdefault(cls.index, {"records": [], "latents": [], "grid": {}})
        entry["records"] += records
        if latents is not None:
            entry["latents"].append(latents)
        entry["grid"].update(grid)
    bar.close()
    timing["generate"] = t_gen
    timing["decode_write"] = t_dec
    generated = sum(map(len, todo))

    ranks.wait_all("generated")
    info = method.manifest_info()
    timing["total"] = time.perf_counter() - t_start
    parts = ranks.gather({"classes": per_class, "timing": dict(timing), "method_info": info,
                          "resumed": resumed, "generated": generated})
    if ranks.rank != 0:
        ranks.share("finished", None)  # wait for rank 0 to write the set: its failure is ours
        return {"out": str(out), "images": generated, "classes": len(ctx.classes), "rank": ranks.rank,
                "seconds": time.perf_counter() - t_start, "resumed": resumed,
                "images_per_s": generated / max(t_gen + t_dec, 1e-9), "timing": timing}
    merged: dict[int, dict] = {}
    for part in parts:
        merged.update(part["classes"])
    info = _merge_info([part["method_info"] for part in parts])
    resumed = sum(part["resumed"] for part in parts)
    generated = sum(part["generated"] for part in parts)
    records, all_latents, grid_rows = [], [], []
    for c in classes:
        entry = merged.get(c.index, {"records": [], "latents": [], "grid": {}})
        records += entry["records"]
        all_latents += [x.float() for x in entry["latents"]]
        row = [entry["grid"][k].numpy() for k in sorted(entry["grid"])][:GRID_PER_CLASS]
        if row:
            grid_rows.append(np.stack(row))
    if len(records) != len(classes) * cfg.ipc:
        raise Mgd3Error(f"internal: {len(records)} images gathered, expected {len(classes) * cfg.ipc}")
    lost = [r["path"] for r in records if not (out / r["path"]).is_file()]
    if lost:  # several nodes, each writing to its own disk
        raise Mgd3Error(f"{len(lost)} images written by other processes are not in {out} (e.g. {lost[0]}); "
                        "with several nodes --out must be a folder every node sees")
    store.write_grid(out / "grid.png", grid_rows)
    if all_latents:
        store.save_torch({"latents": torch.cat(all_latents), "paths": [r["path"] for r in records],
                          "labels": [r["label"] for r in records]}, out / "latents.pt")
    if ranks.world > 1:
        timing["ranks"] = [{k: round(v, 3) for k, v in part["timing"].items()} for part in parts]
        t_gen = max(part["timing"]["generate"] + part["timing"]["decode_write"] for part in parts)
        t_dec = 0.0
    seconds = time.perf_counter() - t_start
    timing["total"] = seconds
    resolved_device = str(backend.device).split(":")[0] if ranks.world > 1 else str(backend.device)
    resolved = dataclasses.asdict(cfg)
    resolved.update(model=str(backend.path), device=resolved_device)
    resolved["sampler"]["cfg"] = ctx.cfg_scale
    resolved["options"] = dataclasses.asdict(options) if options is not None else {}
    store.write_manifest(out, {
        "mgd3_version": mgd3.__version__,
        "git_commit": git_commit(),
        "method": cfg.method,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "data": {"name": cfg.data, "classes": cfg.classes, "data_root": cfg.data_root,
                 "resolution": cfg.save_resolution or data.resolution,  # [text-to-image] was: data.resolution
                 "channels": data.channels, "fingerprint": data.fingerprint()},
        "model": {"path": str(backend.path), "backend": backend.name, "latent_shape": list(backend.latent_shape),
                  "learned_sigma": backend.learned_sigma},
        "classes": [{"class_id": c.class_id, "name": c.name, "class_index": c.index, "label": c.label}
                    for c in classes],
        "method_info": info,
        "config": resolved,
        "timing_s": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()},
        "profile": prof.finish(timing),  # this process's work per stage
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "device": resolved_device, "threads": torch.get_num_threads(), "processes": ranks.world,
                    "resumed_images": resumed},
        "images": records,
    })
    store.remove_partial(out)  # after the manifest: until then the shards are the resume state
    ranks.share("finished", True)
    return {"out": str(out), "images": len(records), "classes": len(classes), "seconds": seconds,
            "images_per_s": generated / max(t_gen + t_dec, 1e-9), "timing": timing, "resumed": resumed,
            "rank": 0}


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


def _recommended_options(backend: Backend, method_cls) -> dict:
    """The model's recommended options for this method, by field name, from its mgd3.json:
    {"defaults": {"methods": {"mgd3": {"lambda": 0.3}}}} (keys are the CLI flags without "--"; `t_stop`
    is `t-stop`, as in a --config file)."""
    rec = (backend.defaults.get("methods") or {}).get(method_cls.name) or {}
    if not rec:
        return {}
    opts = dataclasses.fields(method_cls.Options) if method_cls.Options else ()
    fields = {option_flag(f).lstrip("-"): f.name for f in opts}
    if not isinstance(rec, dict):
        raise Mgd3Error(f"{backend.path}/mgd3.json recommends {rec!r} for method {method_cls.name!r}; "
                        "it must be a mapping of option: value")
    rec = {str(k).replace("_", "-"): v for k, v in rec.items()}
    unknown = sorted(set(rec) - set(fields))
    if unknown:
        raise Mgd3Error(f"{backend.path}/mgd3.json recommends {', '.join(unknown)} for method "
                        f"{method_cls.name!r}, which it does not take")
    return {fields[k]: v for k, v in rec.items()}


def _flag(field_name: str) -> str:
    """The CLI flag of a method option field, whichever method declares it."""
    from mgd3.methods import METHODS, load_methods

    for name in load_methods().names():
        opts = METHODS.get(name).Options
        for f in dataclasses.fields(opts) if opts else ():
            if f.name == field_name:
                return option_flag(f)
    return "--" + field_name.replace("_", "-")
