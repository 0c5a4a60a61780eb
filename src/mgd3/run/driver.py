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
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mgd3.run import bookkeeping as runs
from mgd3.io import store
from mgd3.io.set_reader import read_manifest
from mgd3.run import selection
from mgd3.allocator import keep_freed_memory
from mgd3.files import save_torch_atomic
from mgd3.backends import Backend, load_backend
from mgd3.backends.labels import class_labels
from mgd3.config import resolve_device
from mgd3.errors import Mgd3Error
from mgd3.machine import cpu_threads
from mgd3.methods import (ClassInfo, Context, Item, Method, get_method, check_recommendations, item_seed,
                          load_methods, method_options)
from mgd3.run.profile import StageProfile
from mgd3.run.spec import RunSpec, resolve_run
from mgd3.run.settings import DistillConfig, check_distill_run, shipped_model, validate_distill
from mgd3.run.ranks import Ranks, classes_of_rank
from mgd3.core.sampling import REPRODUCIBILITY, check_cfg_interval

log = logging.getLogger(__name__)

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


def resize_for_saving(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """(B, C, R, R) in [-1, 1] -> (B, C, resolution, resolution), bicubic with antialiasing."""
    if resolution is None or images.shape[-1] == resolution:
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(resolution, resolution), mode="bicubic",
                                          antialias=True, align_corners=False)
    return out.clamp(-1.0, 1.0)


def _validate(cfg: DistillConfig) -> None:
    """Every check that needs no data and no model: the settings' rules (`run.settings`), then the
    ones that relate two settings."""
    validate_distill(cfg)  # types, ranges, choices, device, memory
    if cfg.max_real_per_class is not None and cfg.max_real_per_class < cfg.ipc:
        raise Mgd3Error(f"--max-real-per-class ({cfg.max_real_per_class}) must be at least --ipc ({cfg.ipc})")
    if cfg.select_from is not None and cfg.select_from < 1:
        raise Mgd3Error(f"--select-from must be at least 1 (1: no selection), got {cfg.select_from}")
    check_cfg_interval(cfg.sampler.cfg_interval)


@dataclass(eq=False, repr=False)
class DistillResult(Mapping):
    """What `distill` returns. It also reads as a mapping of its fields (`result["images"]`), the
    summary dict it replaces."""

    out: str
    images: int  # images in the set; on rank > 0 of a torchrun launch, the images this process made
    classes: int  # classes in the set (this process's share on rank > 0)
    seconds: float
    images_per_s: float  # images generated per second of generating and writing
    timing: dict
    resumed: int = 0  # images kept from an interrupted run
    already_complete: bool = False  # the folder already held this set: nothing was generated
    rank: int = 0

    @property
    def complete(self) -> bool:
        """The old name of `already_complete`."""
        return self.already_complete

    def __repr__(self) -> str:
        what = ("already complete, nothing generated" if self.already_complete
                else f"{self.images_per_s:.2f} images/s" + (f", {self.resumed} resumed" if self.resumed else ""))
        rank = f", rank {self.rank}" if self.rank else ""
        return f"DistillResult({self.out!r}, {self.images} images, {self.classes} classes, {self.seconds:.1f} s, {what}{rank})"

    def __getitem__(self, key: str):
        if key == "complete":
            return self.already_complete
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


@dataclass
class _Run:
    """A set-up run: what generating and finalizing need."""

    cfg: DistillConfig  # the settings as given (`spec.config`: resolved)
    spec: RunSpec  # the run resolved once (mgd3.run.spec)
    ranks: Ranks
    backend: Backend
    data: object
    method: Method
    ctx: Context
    out: Path
    state: str  # "new", "resume" or "complete" (see store.open_run)
    t_start: float
    timing: dict[str, float]
    prof: StageProfile  # work per stage: forwards, FLOPs (mgd3.run.profile)
    selector: selection.Selector | None = None  # --select-from G > 1: the candidates' selector

    @property
    def classes(self) -> list[ClassInfo]:
        """Every class of the run (ctx.classes: this process's share)."""
        return list(self.spec.classes)


def distill(cfg: DistillConfig, backend: Backend | None = None) -> DistillResult:
    """Run one distillation. `backend`: an already-loaded model to use instead of loading
    `cfg.model` (its path, device and precision win over the config's). Under torchrun every
    process calls this; see `mgd3.run.ranks.Ranks`."""
    _validate(cfg)  # every check that needs no model, before threads are set or processes join
    ranks = Ranks.from_env()
    try:
        with cpu_threads(cfg.threads):
            return _distill(cfg, ranks, backend)
    except BaseException as e:
        ranks.abort(e)
        raise
    finally:
        ranks.close()


def _distill(cfg: DistillConfig, ranks: Ranks, backend: Backend | None = None) -> DistillResult:
    run = _set_up(cfg, ranks, backend)
    if run.state == "complete":
        n = len(read_manifest(run.out).get("images", []))
        log.info("%s already holds the complete set for these settings; nothing to do", run.out)
        return DistillResult(str(run.out), n, len(run.classes), time.perf_counter() - run.t_start, 0.0,
                             run.timing, resumed=n, already_complete=True, rank=ranks.rank)
    outputs, generated, resumed = _generate(run)
    return _finalize(run, outputs, generated, resumed)


# --- set-up: model, options, data, classes, method; then the output folder


def _set_up(cfg: DistillConfig, ranks: Ranks, backend: Backend | None) -> _Run:
    from mgd3.io.data import load_data

    t_start = time.perf_counter()
    keep_freed_memory()  # no page-fault churn in the sampling loop (allocator.py)
    method_cls = get_method(cfg.method)
    given = method_options(method_cls, cfg.options)  # a bad option stops the run before anything loads
    selection.check(method_cls, given, cfg.select_from)
    if method_cls.needs_cache and not cfg.use_cache:
        raise Mgd3Error(f"--method {method_cls.name} keeps its surrogate in the cache (--cache-dir) and trains it "
                        "only once; without the cache it would be trained again on every run: drop --no-cache")
    t = time.perf_counter()
    backend, cfg = _backend(cfg, ranks, backend, method_cls)
    strictness = "strict" if cfg.strict else "skip"
    if backend is None:  # a method that needs no model, and none given (Method.needs)
        prof = StageProfile()
        data = load_data(cfg.data, "train", resolution=cfg.resolution, classes=cfg.classes, data_root=cfg.data_root,
                         class_map=cfg.class_map, bad_files=strictness, cache_dir=cfg.cache_dir)
        labels = list(range(len(data.class_ids)))  # no model: a class's label is its index
    else:
        check_recommendations(backend)  # the method options its mgd3.json recommends, before any data loads
        prof, backend = StageProfile.observe(backend)  # the run's view; the caller's backend stays as it is
        _set_resolution(backend, cfg)
        if cfg.sampler.cfg_channels is not None and cfg.sampler.cfg_channels > backend.latent_shape[0]:
            raise Mgd3Error(f"--cfg-channels {cfg.sampler.cfg_channels} > latent channels {backend.latent_shape[0]}")
        data = load_data(cfg.data, "train", resolution=backend.resolution, channels=backend.image_channels,
                         classes=cfg.classes, data_root=cfg.data_root, class_map=cfg.class_map,
                         bad_files=strictness, cache_dir=cfg.cache_dir)
        labels = class_labels(data, backend, cfg.prompt, cfg.negative_prompt)
    spec = resolve_run(cfg, backend, data, labels, method_cls)
    timing = {"load": time.perf_counter() - t}
    ctx = Context(backend, data, list(spec.classes), cfg.ipc, cfg.seed, spec.sampler,
                  encode_batch_size=cfg.encode_batch_size, encode_workers=cfg.encode_workers,
                  cache_dir=cfg.cache_dir, use_cache=cfg.use_cache, progress=cfg.progress and ranks.rank == 0,
                  max_real_per_class=cfg.max_real_per_class, method=cfg.method, recommendation=spec.recommendation)
    method = method_cls(spec.options) if method_cls.Options else method_cls()
    method.validate(ctx)
    run = _Run(cfg, spec, ranks, backend, data, method, ctx, Path(cfg.out).expanduser(), "new", t_start, timing,
               prof)
    run.state = _open_output(run)
    return run


def _backend(cfg: DistillConfig, ranks: Ranks, backend: Backend | None,
             method_cls: type[Method]) -> tuple[Backend | None, DistillConfig]:
    """The model of the run (`backend` when given: the config then names its path and precision);
    None for a method that needs no model (`Method.needs`) when none is given or shipped."""
    if backend is not None:
        return backend, dataclasses.replace(cfg, model=str(backend.path), precision=backend.precision)
    model = cfg.model or shipped_model(cfg.data)
    if model is None and method_cls.needs == "nothing":
        return None, cfg
    if model is None:
        from mgd3.io.data import check_data_name

        check_data_name(cfg.data)  # an unknown name is said as such, not as a missing model
        raise Mgd3Error(f"no --model given and mgd3 ships no model for {cfg.data!r}; pass --model PATH "
                        f"(methods that need no model: {', '.join(_model_free_methods())})")
    device = resolve_device(cfg.device)
    if ranks.world > 1 and device == "cuda":
        device = f"cuda:{ranks.local_rank}"  # one GPU per process of the node
    return load_backend(model, device=device, precision=cfg.precision), cfg


def _model_free_methods() -> list[str]:
    reg = load_methods()
    return [n for n in reg.names() if reg.get(n).needs == "nothing"]


def _device_name(run: "_Run") -> str:
    return str(run.backend.device) if run.backend is not None else "cpu"


def _open_output(run: _Run) -> str:
    """Open the output folder (rank 0, only after every check passed); every process gets its state."""
    cfg, ranks = run.cfg, run.ranks
    check_distill_run(cfg, run.backend, run.classes, run.spec.sampler.cfg)  # before the output folder is touched
    store.refuse_out_inside_data(cfg.out, cfg.data)  # issue 32: it would become a class on the next run
    key = runs.run_key(run.spec, run.backend, run.data, run.method.order_dependent)
    state = None
    if ranks.rank == 0:
        info = {"batch_size": cfg.batch_size, "encode_batch_size": cfg.encode_batch_size,
                "device": _device_name(run), "processes": ranks.world}
        out, state = store.open_run(cfg.out, cfg.overwrite, key, info)
        if state == "resume":
            runs.warn_resume_differences(out, info)
    run.ctx.run_dir = run.out / store.PARTIAL  # a method's own resume state (dm), removed with the shards
    return ranks.share("open", state)


# --- generate: this process's classes, batch by batch, each batch written as it finishes


def _generate(run: _Run) -> tuple[dict[int, runs.ClassOutput], int, int]:
    """Generate (or take from an interrupted run) this process's classes r, r+N, ...; returns
    {class index: ClassOutput}, the images generated and the images resumed."""
    cfg, ctx, method = run.cfg, run.ctx, run.method
    ctx.classes = classes_of_rank(run.classes, run.ranks.world, run.ranks.rank)
    t = time.perf_counter()
    run.prof.enter("prepare")
    method.prepare(ctx)  # deterministic (and encodings are cached), so also run on resume
    run.timing["prepare"] = time.perf_counter() - t

    work = runs.batches_to_generate(ctx.classes, cfg.ipc, cfg.seed, cfg.batch_size, run.out,
                                    run.state == "resume", method.order_dependent)
    todo = [items for _, items in work if items is not None]
    generative = type(method).generative
    bar = tqdm(total=len(todo) * (run.spec.sampler.steps if generative else 1),
               desc=f"{cfg.method} ×{sum(map(len, todo))}", unit="step", disable=not ctx.progress)
    if generative:
        ctx.observers = [lambda step: bar.update(1)]
    run.timing.update(generate=0.0, decode_write=0.0)
    outputs: dict[int, runs.ClassOutput] = {}
    resumed = 0
    for shard, items in work:
        run.ranks.check()  # stop soon when another process failed
        if shard is not None:  # finished by an interrupted run
            cls = shard["cls"]
            resumed += len(shard["indices"])
            if shard["latents"] is not None:
                method.replay(ctx, [Item(cls, k, item_seed(cfg.seed, cls.class_id, k)) for k in shard["indices"]],
                              shard["latents"])
        else:
            cls = items[0].cls
            shard = _generate_batch(run, items)
            if not generative:
                bar.update(1)
        outputs.setdefault(cls.index, runs.ClassOutput()).add(shard)
    bar.close()
    return outputs, sum(map(len, todo)), resumed


def _generate_batch(run: _Run, items: list[Item]) -> dict:
    """Generate, decode and write one batch; its shard is saved after its images (the batch is done)."""
    t = time.perf_counter()
    run.prof.enter("generate", images=len(items))
    if (run.cfg.select_from or 1) > 1:
        if run.selector is None:
            run.selector = selection.Selector(run.cfg.select_from, run.cfg.batch_size)
        result = run.selector.generate(run.ctx, run.method, items)
    else:
        result = run.method.generate(run.ctx, items)
    run.timing["generate"] += time.perf_counter() - t
    t = time.perf_counter()
    run.prof.enter("decode_write", images=len(items))
    images = result.images if result.images is not None else run.backend.decode(result.latents)
    images = resize_for_saving(images, run.cfg.save_resolution)  # no-op when None
    n_classes = len(run.spec.classes)
    folders = [store.class_folder(it.cls.index, it.cls.class_id, n_classes) for it in items]
    pixels = store.to_pixels(images)  # (B, R, R[, 3]) uint8: the PNGs' and the shard's, converted once
    paths = store.write_images(run.out, folders, [it.index for it in items], images, pixels)
    run.timing["decode_write"] += time.perf_counter() - t
    latents = result.latents.detach().cpu() if result.latents is not None else None
    shard = runs.make_shard(items, paths, latents, pixels, result.mode_ids, result.extra)
    store.save_shard(run.out, items[0].cls.index, items[0].index, shard)
    return shard


# --- finalize: rank 0 gathers every process's classes and writes latents, grid and manifest


def _finalize(run: _Run, outputs: dict[int, runs.ClassOutput], generated: int, resumed: int) -> DistillResult:
    ranks, timing = run.ranks, run.timing
    ranks.wait_all("generated")
    timing["total"] = time.perf_counter() - run.t_start
    parts = ranks.gather({"classes": outputs, "timing": dict(timing), "method_info": run.method.manifest_info(),
                          "resumed": resumed, "generated": generated})
    if ranks.rank != 0:
        ranks.share("finished", None)  # wait for rank 0 to write the set: its failure is ours
        busy = timing["generate"] + timing["decode_write"]
        return DistillResult(str(run.out), generated, len(run.ctx.classes), time.perf_counter() - run.t_start,
                             generated / max(busy, 1e-9), timing, resumed=resumed, rank=ranks.rank)
    n = _write_set(run, parts)
    ranks.share("finished", True)
    generated = sum(part["generated"] for part in parts)
    busy = timing["generate"] + timing["decode_write"]
    if ranks.world > 1:
        busy = max(part["timing"]["generate"] + part["timing"]["decode_write"] for part in parts)
    return DistillResult(str(run.out), n, len(run.classes), timing["total"], generated / max(busy, 1e-9), timing,
                         resumed=sum(part["resumed"] for part in parts))


def _write_set(run: _Run, parts: list[dict]) -> int:
    """Write grid.png, latents.pt and, last, manifest.json from every process's part; returns the
    number of images."""
    cfg, out, timing = run.cfg, run.out, run.timing
    outputs: dict[int, runs.ClassOutput] = {}
    for part in parts:
        outputs.update(part["classes"])
    records, latents, rows = runs.assemble(run.classes, outputs)
    if len(records) != len(run.classes) * cfg.ipc:
        raise Mgd3Error(f"internal: {len(records)} images gathered, expected {len(run.classes) * cfg.ipc}")
    lost = [r["path"] for r in records if not (out / r["path"]).is_file()]
    if lost:  # several nodes, each writing to its own disk
        raise Mgd3Error(f"{len(lost)} images written by other processes are not in {out} (e.g. {lost[0]}); "
                        "with several nodes --out must be a folder every node sees")
    names = [c.name for c in run.classes if c.index in outputs and outputs[c.index].grid]  # the rows' classes
    store.write_grid(out / "grid.png", rows, labels=names)
    if latents is not None:
        save_torch_atomic({"latents": latents, "paths": [r["path"] for r in records],
                          "labels": [r["label"] for r in records]}, out / "latents.pt")
    world = run.ranks.world
    if world > 1:
        timing["ranks"] = [{k: round(v, 3) for k, v in part["timing"].items()} for part in parts]
    timing["total"] = time.perf_counter() - run.t_start
    device = _device_name(run).split(":")[0] if world > 1 else _device_name(run)
    info = runs.merge_info([part["method_info"] for part in parts])
    resumed = sum(part["resumed"] for part in parts)
    manifest = runs.manifest(run.spec, run.backend, run.data, info, timing, device, world, resumed, records)
    manifest["profile"] = run.prof.finish(timing)  # this process's work per stage
    recommended = run.spec.recommended  # what the model's mgd3.json set (None: nothing)
    manifest["recommended"] = recommended.record() if recommended is not None else None
    manifest["reproducibility"] = REPRODUCIBILITY  # what is bit-identical and what is not
    store.write_manifest(out, manifest)
    store.remove_partial(out)  # after the manifest: until then the shards are the resume state
    return len(records)

