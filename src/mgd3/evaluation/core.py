"""Stage: evaluation — score a distilled set (or a real-data reference) under a protocol.

Reads a set from disk (`DIR/images/<NNN>-<class_id>/<k>.png` + `DIR/manifest.json`, or a plain
ImageFolder), the real test split of the same classes (matched by class id), trains fresh
networks with explicit seeds and writes `eval.json`. Knows nothing of diffusion.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import platform
from pathlib import Path

import numpy as np
import torch

from mgd3.version import __version__
from mgd3.errors import Mgd3Error
from mgd3.evaluation import checkpoint as C
from mgd3.evaluation import dist as D
from mgd3.evaluation import references as R
from mgd3.evaluation.networks import NETWORKS
from mgd3.evaluation.settings import EvalConfig  # noqa: F401  (re-exported)
from mgd3.evaluation.protocols import PROTOCOLS, Protocol, override, resolve, to_dict
from mgd3.evaluation.train import (Normalization, RunOptions, TensorSet, center_crop, imagenet_normalization,
                                 resolve_device, tensor_set, to_uint8)
from mgd3.machine import cpu_name
from mgd3.evaluation.scores import lrs
from mgd3.io.set_reader import DistilledSet, read_set  # noqa: F401  (the one reader of the set format)

log = logging.getLogger(__name__)

EVAL_FORMAT = "mgd3-eval/1"
REFERENCES = ("random-real", "full")


def load_set_images(s: DistilledSet, resolution: int, channels: int) -> TensorSet:
    """The set's images as uint8 (N, channels, R, R): resized (shorter side) and centre-cropped
    to R like the real data (mgd3.io.sources' transform)."""
    from mgd3.io.sources import read_image, to_model_space

    xs = [to_uint8(to_model_space(read_image(f, channels, resolution), resolution, channels)) for f in s.files]
    return TensorSet(torch.stack(xs), torch.as_tensor(s.targets, dtype=torch.int64))


# --------------------------------------------------------------------------- shared preparation


def _load_real(name: str, split: str, *, resolution: int, channels: int, classes, cfg: EvalConfig):
    from mgd3.io.data import load_data

    return load_data(name, split, resolution=resolution, channels=channels, classes=classes,
                     data_root=cfg.data_root, class_map=cfg.class_map)


def _protocol(cfg: EvalConfig) -> Protocol:
    p = PROTOCOLS.get(cfg.protocol)
    if cfg.arch:
        NETWORKS.get(cfg.arch.lower())  # unknown arch -> one-line error listing the known ones
    opts = dict(cfg.options)
    if cfg.teacher_epochs is not None:
        opts["teacher_epochs"] = cfg.teacher_epochs
    if "dsa_same_params" in opts:  # convenience: a DSA field
        same = bool(opts.pop("dsa_same_params"))
        if p.dsa is None:
            raise Mgd3Error(f"protocol {p.name} does not use DSA (dsa_same_params applies to dc-dsa)")
        opts["dsa"] = dataclasses.replace(p.dsa, same_params=same)
    return override(p, **opts) if opts else p


def _test_set(name: str, class_ids, p: Protocol, channels: int, cfg: EvalConfig):
    """Real test split of the classes, at the protocol resolution (resize R*test_resize, crop R)."""
    r = p.resolution
    r_load = int(round(r * p.test_resize)) if (p.test_resize != 1.0 and r >= 128) else r
    data = _load_real(name, "test", resolution=r_load, channels=channels, classes=class_ids, cfg=cfg)
    if len(data.class_ids) != len(class_ids):  # load_data keeps the order asked for
        raise Mgd3Error(f"test split of {name}: {len(data.class_ids)} classes found, expected {len(class_ids)}")
    ts = center_crop(tensor_set(data.dataset(), workers=cfg.workers, progress=cfg.progress,
                                desc=f"loading {name} test"), r)
    return data, ts


def _normalization(p: Protocol, train_data, channels: int, cfg: EvalConfig) -> Normalization:
    if p.normalize == "imagenet":
        return imagenet_normalization(channels)
    if p.normalize == "dataset":
        return R.cached_normalization(
            train_data.fingerprint(),
            lambda: tensor_set(train_data.dataset(), workers=cfg.workers, progress=cfg.progress,
                               desc="dataset statistics"),
            cfg.cache_dir, cfg.use_cache)
    raise Mgd3Error(f"unknown normalisation {p.normalize!r}; known: dataset, imagenet")


def _teacher(p: Protocol, train_data, test: TensorSet, norm, opts, cfg: EvalConfig):
    if p.loss != "kl":
        return None, None
    if p.teacher_epochs < 1:
        raise Mgd3Error("the soft protocol needs teacher_epochs >= 1 (--teacher-epochs)")
    return R.get_teacher(p, train_fp=train_data.fingerprint(), test_fp=_fp(test), test=test,
                         make_train=lambda: tensor_set(train_data.dataset(), workers=cfg.workers,
                                                       progress=cfg.progress, desc="loading teacher data"),
                         num_classes=len(train_data.class_ids), norm=norm, opts=opts, cache_dir=cfg.cache_dir,
                         use_cache=cfg.use_cache)


def _fp(t: TensorSet) -> str:
    import hashlib

    h = hashlib.sha256(t.images.numpy().tobytes())
    h.update(t.targets.numpy().tobytes())
    return h.hexdigest()[:16]


def _summary(runs: list[dict]) -> dict:
    final = np.array([r["final_acc"] for r in runs], dtype=float)
    last = np.array([r["last_acc"] for r in runs], dtype=float)
    best = np.array([r["best_acc"] for r in runs], dtype=float)
    r2 = lambda v: round(float(v), 2)  # noqa: E731
    return {"mean": r2(final.mean()), "std": r2(final.std()), "mean_last": r2(last.mean()),
            "std_last": r2(last.std()), "mean_best": r2(best.mean()), "std_best": r2(best.std()),
            "train_seconds": r2(sum(r["train_seconds"] for r in runs))}


def _environment(device: torch.device, cfg: EvalConfig) -> dict:
    return {"device": str(device), "bf16": cfg.bf16, "compile": cfg.compile, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": cpu_name(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _opts(cfg: EvalConfig) -> RunOptions:
    return RunOptions(device=str(resolve_device(cfg.device)), bf16=cfg.bf16, compile=cfg.compile,
                      progress=cfg.progress)


# --------------------------------------------------------------------------- entry points


def evaluate_set(cfg: EvalConfig, ranks=None) -> dict:
    """Train fresh networks on the distilled set `cfg.set_dir`; write and return eval.json.
    Under torchrun (`ranks`), every process calls this; rank 0 writes and returns the result."""
    ranks = ranks or D.ONE
    if not cfg.seeds:
        raise Mgd3Error("give at least one evaluation seed")
    s = read_set(cfg.set_dir)
    p0 = _protocol(cfg)
    name, cfg = _set_data(cfg, s)
    channels = _manifest_int(s, "channels", (1, 3)) or _channels_of(s)
    set_res = _manifest_int(s, "resolution", range(1, 16385)) or _resolution_of(s)
    if cfg.data_root is not None and not isinstance(cfg.data_root, str):
        raise Mgd3Error(f"{s.path}/manifest.json: data.data_root must be a string")
    p = resolve(p0, ipc=s.ipc, num_classes=len(s.class_ids), n_images=len(s.targets), set_resolution=set_res,
                data_name=str(name), arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size,
                resolution=cfg.resolution)
    from mgd3.config import check_memory

    # the set as uint8 at the protocol resolution, plus a float copy of a batch per image
    check_memory(len(s.files) * channels * p.resolution**2 * 5, f"{len(s.files)} images at {p.resolution} px",
                 "use a smaller --resolution")
    plan = D.plan(cfg.dist_mode, world=ranks.world, seeds=list(cfg.seeds), batch_size=p.batch_size)
    device = D.process_device(resolve_device(cfg.device), ranks.local_rank, ranks.world)
    opts = dataclasses.replace(_opts(cfg), device=str(device), progress=cfg.progress and ranks.rank == 0)
    out = Path(cfg.out) if cfg.out else s.path / "eval.json"
    test_data, test = _test_set(name, s.class_ids, p, channels, cfg)
    train_data = _load_real(name, "train", resolution=p.resolution, channels=channels, classes=s.class_ids, cfg=cfg)
    norm, teacher, teacher_rec = _prepare(p, train_data, test, channels, opts, cfg, ranks, len(s.class_ids))
    train = load_set_images(s, p.resolution, channels)
    log.info("evaluating %s: %d images, %d classes, protocol %s, %s at %dx%d, seeds %s%s", s.path, len(train),
             len(s.class_ids), p.name, p.arch, p.resolution, p.resolution, cfg.seeds,
             "" if plan.mode == "single" else f"; {ranks.world} processes, mode {plan.mode} ({plan.reason})")
    key = R.key_of({"v": __version__, "protocol": to_dict(p), "train": _fp(train), "test": test_data.fingerprint(),
                    "norm": dataclasses.asdict(norm), "teacher": (teacher_rec or {}).get("cache_file"),
                    "device": device.type, "bf16": cfg.bf16, "compile": cfg.compile, "mode": plan.mode,
                    "world": ranks.world if plan.mode == "ddp" else 1})
    ckpt_dir = C.folder_for(out, key)
    runs, distributed = _train_all(p, train, test, cfg, plan, ranks, len(s.class_ids), norm, opts, teacher,
                                   ckpt_dir, key, device)
    if ranks.rank != 0:
        ranks.share("written", None)  # wait for rank 0's eval.json: its failure is this process's too
        return {}
    result = _set_result(cfg, s, str(name), p, channels, len(train), test, train_data, test_data, norm, runs,
                         device)
    if teacher_rec:
        result["teacher"] = teacher_rec
    if distributed:
        result["distributed"] = distributed
        result["environment"]["device"] = device.type
    if cfg.random_real and R.find_reference("random-real", train_data.fingerprint(), p, ipc=s.ipc,
                                            cache_dir=cfg.cache_dir) is None:
        _random_real_baseline(cfg, str(name), s, p, runs)
    _attach_references(result, p, train_data.fingerprint(), s.ipc, cfg)
    R.write_json_atomic(out, result)  # only now, every process's runs gathered: never a partial eval.json
    if not cfg.out:  # keep every protocol/arch's latest result too; eval.json is the last run
        R.write_json_atomic(s.path / "evals" / f"{p.name}-{p.arch}-e{p.epochs}.json", result)
    C.remove(ckpt_dir)
    ranks.share("written", True)
    result["out"] = str(out)
    return result


def _set_data(cfg: EvalConfig, s: DistilledSet) -> tuple[str, EvalConfig]:
    """The data set a distilled set is scored on (`--data`, else the manifest's) and `cfg` with the
    manifest's data root; what the manifest names must lie inside the set, else the user names it."""
    name = cfg.data or s.data.get("name")
    if name is not None and not isinstance(name, str):
        raise Mgd3Error(f"{s.path}/manifest.json: data.name must be a string, got {str(name)[:40]!r}")
    if not name:
        raise Mgd3Error(f"{s.path} does not name its data set (plain ImageFolder): pass --data")
    if not cfg.data:  # what the manifest names is read only inside the set, else the user names it (issue 32)
        from mgd3.io.data import DATASETS
        from mgd3.io.set_reader import named_outside

        head, sep, tail = name.partition(":")
        if head in DATASETS and sep:  # "imagenette:/path/to/imagenet"
            named_outside(s.path, tail, "the data root", f"--data {name}")
        elif name not in DATASETS:
            name = named_outside(s.path, name, "the data folder", f"--data {name}")
        if cfg.data_root is None and s.data.get("data_root"):
            cfg = dataclasses.replace(cfg, data_root=named_outside(
                s.path, s.data["data_root"], "the data root", f"--data-root {s.data['data_root']}"))
    return name, cfg


def _set_result(cfg: EvalConfig, s: DistilledSet, name: str, p: Protocol, channels: int, num_images: int,
                test: TensorSet, train_data, test_data, norm: Normalization, runs: list[dict],
                device: torch.device) -> dict:
    """eval.json of a distilled set, before the teacher, distribution and reference records."""
    return {
        "format": EVAL_FORMAT, "mgd3_version": __version__, "kind": "distilled",
        "set": {"path": str(s.path), "method": (s.manifest or {}).get("method"), "ipc": s.ipc,
                "generation_seed": (s.manifest or {}).get("seed"), "num_images": num_images,
                "num_classes": len(s.class_ids), "class_ids": s.class_ids, "manifest": s.manifest is not None},
        "data": {"name": name, "test_images": len(test), "train_fingerprint": train_data.fingerprint(),
                 "test_fingerprint": test_data.fingerprint(), "resolution": p.resolution, "channels": channels},
        "protocol": to_dict(p), "arch": p.arch, "reported": p.describe(),
        "normalization": dataclasses.asdict(norm), "seeds": list(cfg.seeds), "runs": runs, **_summary(runs),
        "std_note": "population std over evaluation seeds (numpy ddof=0, as the DC code)",
        "environment": _environment(device, cfg), "config": _config_dict(cfg),
    }


def _prepare(p: Protocol, train_data, test: TensorSet, channels: int, opts: RunOptions, cfg: EvalConfig,
             ranks, num_classes: int):
    """Normalisation and teacher: made (or read from the cache) by rank 0 alone, then sent to
    the other processes over the process group (no shared cache needed, nothing trained twice)."""
    if ranks.world == 1:
        norm = _normalization(p, train_data, channels, cfg)
        return (norm, *_teacher(p, train_data, test, norm, opts, cfg))
    if ranks.rank == 0:
        norm = _normalization(p, train_data, channels, cfg)
        teacher, rec = _teacher(p, train_data, test, norm, opts, cfg)
        state = None if teacher is None else {k: v.detach().cpu() for k, v in
                                              getattr(teacher, "_orig_mod", teacher).state_dict().items()}
    ranks.wait_all("prepared")  # polls for failures: a long teacher training never times out the others
    norm, rec, state = ranks.broadcast((norm, rec, state) if ranks.rank == 0 else None)
    if ranks.rank == 0 or state is None:
        return norm, (teacher if ranks.rank == 0 else None), rec
    from mgd3.evaluation.networks import build_network
    from mgd3.evaluation.references import teacher_protocol

    tp = teacher_protocol(p)
    teacher = build_network(tp.arch, channels, num_classes, p.resolution)
    teacher.load_state_dict(state)
    return norm, teacher.eval(), rec


def _train_all(p: Protocol, train: TensorSet, test: TensorSet, cfg: EvalConfig, plan: D.Plan, ranks,
               num_classes: int, norm: Normalization, opts: RunOptions, teacher, ckpt_dir: Path, key: str,
               device: torch.device) -> tuple[list[dict], dict | None]:
    """Every seed's run (rank 0; [] elsewhere) and the `distributed` record (None in one process)."""
    import time

    from mgd3.evaluation.train import Shard, train_and_test

    shard = None
    if plan.mode == "ddp":
        shard = Shard(ranks.rank, ranks.world, D.gradient_group(device))
    writer = shard is None or ranks.rank == 0

    def one(sd: int) -> dict:
        ck = C.Checkpoint(ckpt_dir, sd, key, every_s=cfg.checkpoint_s, writer=writer,
                          share=ranks.broadcast if shard is not None else None, poll=ranks.check)
        done = ck.finished() if writer else None
        if shard is not None:
            done = ranks.broadcast(done)
        if done is not None:
            log.info("seed %d: finished by an earlier run of this configuration (%s)", sd, ck.result_path)
            return done
        r = train_and_test(p, train, test, seed=sd, num_classes=num_classes, norm=norm, opts=opts,
                           teacher=teacher, shard=shard, checkpoint=ck)
        ck.finish(r)
        return r

    t0 = time.perf_counter()
    if plan.mode == "single":
        return [one(sd) for sd in cfg.seeds], None
    mine = plan.mine(ranks.rank, cfg.seeds) if plan.mode == "seeds" else list(range(len(cfg.seeds)))
    runs = {i: one(cfg.seeds[i]) for i in mine}
    info = D.rank_info(ranks.rank, ranks.local_rank, device, [cfg.seeds[i] for i in mine],
                       time.perf_counter() - t0)
    ranks.wait_all("trained")
    parts = ranks.gather({"runs": runs if (plan.mode == "seeds" or ranks.rank == 0) else {}, "info": info})
    if ranks.rank != 0:
        return [], None
    gathered: dict[int, dict] = {}
    for part in parts:
        gathered.update(part["runs"])
    if sorted(gathered) != list(range(len(cfg.seeds))):
        raise Mgd3Error(f"internal: runs of seeds {sorted(gathered)} gathered, expected {len(cfg.seeds)}")
    backend = "gloo" if shard is None or device.type != "cuda" else "nccl (gradients) + gloo"
    return ([gathered[i] for i in range(len(cfg.seeds))],
            D.record(plan, backend=backend, per_rank=[part["info"] for part in parts]))


def evaluate_reference(cfg: EvalConfig) -> dict:
    """Random-real subsets or the full real train split under the same protocol, cached."""
    kind = cfg.reference
    if kind not in REFERENCES:
        raise Mgd3Error(f"unknown reference {kind!r}; known: {', '.join(REFERENCES)}")
    if not cfg.data:
        raise Mgd3Error("--data is required with --reference")
    if not cfg.seeds:
        raise Mgd3Error("give at least one evaluation seed")
    if kind == "random-real" and (cfg.ipc is None or cfg.ipc < 1):
        raise Mgd3Error("--reference random-real needs --ipc N (N >= 1)")
    p0 = _protocol(cfg)
    probe = _load_real(cfg.data, "train", resolution=cfg.resolution, channels=None, classes=cfg.classes, cfg=cfg)
    channels, num_classes = probe.channels, len(probe.class_ids)
    counts = np.bincount(probe.targets, minlength=num_classes)
    ipc = cfg.ipc if kind == "random-real" else int(counts.max())
    n_images = min(ipc, int(counts.min())) * num_classes if kind == "random-real" else len(probe)
    p = resolve(p0, ipc=ipc, num_classes=num_classes, n_images=n_images, set_resolution=probe.resolution,
                data_name=cfg.data, arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size,
                resolution=cfg.resolution)
    device = resolve_device(cfg.device)
    opts = _opts(cfg)
    train_data = probe if probe.resolution == p.resolution else _load_real(
        cfg.data, "train", resolution=p.resolution, channels=channels, classes=cfg.classes, cfg=cfg)
    test_data, test = _test_set(cfg.data, train_data.class_ids, p, channels, cfg)
    norm = _normalization(p, train_data, channels, cfg)
    teacher, teacher_rec = _teacher(p, train_data, test, norm, opts, cfg)
    cache: dict = {}

    def make_train(seed: int) -> TensorSet:
        if kind == "full":
            if "full" not in cache:
                cache["full"] = tensor_set(train_data.dataset(), workers=cfg.workers, progress=cfg.progress,
                                           desc=f"loading {cfg.data} train")
            return cache["full"]
        idx = R.random_real_indices(train_data.targets, num_classes, ipc, seed)
        return tensor_set(train_data.dataset(idx), workers=cfg.workers)

    train_fp = train_data.fingerprint()
    runs, folder = R.run_reference(kind, p=p, seeds=cfg.seeds, ipc=ipc if kind == "random-real" else None,
                                   train_fp=train_fp, test_fp=test_data.fingerprint(), make_train=make_train,
                                   test=test, num_classes=num_classes, norm=norm, opts=opts, teacher=teacher,
                                   cache_dir=cfg.cache_dir, use_cache=cfg.use_cache)
    result = _reference_result(cfg, ipc, n_images, num_classes, p, channels, test, train_data, test_data, norm,
                               runs, device)
    if teacher_rec:
        result["teacher"] = teacher_rec
    if R.cache_json(folder / "result.json", result):
        result["cache_file"] = str(folder / "result.json")
    if cfg.out:
        R.write_json_atomic(Path(cfg.out), result)
        result["out"] = cfg.out
    return result


def _reference_result(cfg: EvalConfig, ipc: int, n_images: int, num_classes: int, p: Protocol, channels: int,
                      test: TensorSet, train_data, test_data, norm: Normalization, runs: list[dict],
                      device: torch.device) -> dict:
    """The result of a reference (`cfg.reference`), before the teacher and cache records."""
    kind = cfg.reference
    return {
        "format": EVAL_FORMAT, "mgd3_version": __version__, "kind": kind,
        "ipc": ipc if kind == "random-real" else None,
        "subset_seeds": list(cfg.seeds) if kind == "random-real" else None,
        "subset_rule": "subset i: numpy.random.default_rng(seed i).choice of IPC items per class, no replacement"
        if kind == "random-real" else None,
        "set": {"num_images": n_images, "num_classes": num_classes, "class_ids": list(train_data.class_ids)},
        "data": {"name": cfg.data, "test_images": len(test), "train_fingerprint": train_data.fingerprint(),
                 "test_fingerprint": test_data.fingerprint(), "resolution": p.resolution, "channels": channels},
        "protocol": to_dict(p), "arch": p.arch, "reported": p.describe(),
        "epochs_overridden": cfg.epochs is not None,
        "normalization": dataclasses.asdict(norm), "seeds": list(cfg.seeds), "runs": runs, **_summary(runs),
        "std_note": "population std over evaluation seeds (numpy ddof=0, as the DC code)",
        "environment": _environment(device, cfg), "config": _config_dict(cfg),
    }


def evaluate(cfg: EvalConfig, ranks=None) -> dict:
    """A distilled set (`cfg.set_dir`) or a reference (`cfg.reference`), per `cfg`. `ranks`: the
    processes of a torchrun launch (`mgd3.run.ranks.Ranks`, made by the caller through
    `mgd3.run.ranks.launched`; see `mgd3.evaluation.dist`), every one calling this; rank 0 returns
    the result, the others {}. None: one process."""
    return _evaluate(cfg, ranks or D.ONE)


def _evaluate(cfg: EvalConfig, ranks) -> dict:
    from mgd3.evaluation.settings import validate_eval

    validate_eval(cfg)
    if cfg.reference and cfg.set_dir:
        raise Mgd3Error("give either a distilled set or --reference, not both")
    if not cfg.reference and not cfg.set_dir:
        raise Mgd3Error("give a distilled set folder (or --reference random-real|full)")
    if cfg.threads is not None and cfg.threads < 1:
        raise Mgd3Error(f"--threads must be at least 1, got {cfg.threads}")
    before = torch.get_num_threads()
    if cfg.threads:
        # on a shared CPU, fewer threads than cores avoids OpenMP oversubscription stalls
        torch.set_num_threads(cfg.threads)
    if cfg.reference and ranks.world > 1:
        raise Mgd3Error("--reference runs in one process (it is cached and reused by every later evaluation); "
                        "run it without torchrun")
    try:
        return evaluate_reference(cfg) if cfg.reference else evaluate_set(cfg, ranks)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def _random_real_baseline(cfg: EvalConfig, name: str, s: DistilledSet, p: Protocol, runs: list[dict]) -> None:
    """Train and cache the random-real reference a set's IOR needs (`mgd3 evaluate --reference
    random-real` with the set's data, classes, IPC, protocol and seeds): as many images as the
    set, so about the set's own training time again."""
    est = sum(float(r.get("train_seconds") or 0.0) for r in runs)
    log.info("no random-real reference for IPC %d under %s/%s is cached: training it now on %d seeds "
             "(about %.0f s, the time the set took; cached for every later set; --no-reference skips it)",
             s.ipc, p.name, p.arch, len(cfg.seeds), est)
    ref = dataclasses.replace(cfg, set_dir=None, reference="random-real", ipc=s.ipc, data=name,
                              classes=list(s.class_ids), out=None, random_real=False)
    evaluate_reference(ref)


def _attach_references(result: dict, p: Protocol, train_fp: str, ipc: int, cfg: EvalConfig) -> None:
    """IOR / HLR (docs/METHODS.md §6.1) from cached references under the same protocol, when present."""
    refs = {}
    rr = R.find_reference("random-real", train_fp, p, ipc=ipc, cache_dir=cfg.cache_dir)
    full = R.find_reference("full", train_fp, p, ipc=None, cache_dir=cfg.cache_dir)
    if rr:
        refs["random_real"] = {k: rr.get(k) for k in ("mean", "std", "seeds", "ipc", "cache_file")}
        result["ior"] = round(result["mean"] - rr["mean"], 2)
    if full:
        refs["full"] = {k: full.get(k) for k in ("mean", "std", "seeds", "cache_file")}
        refs["full"]["epochs"] = full["protocol"]["epochs"]
        if full.get("source"):
            refs["full"]["source"] = full["source"]
        result["hlr"] = round(full["mean"] - result["mean"], 2)
    if rr and full:
        result["lrs"] = lrs(result["ior"], result["hlr"])
    if refs:
        result["references"] = refs


def _config_dict(cfg: EvalConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("progress", None)
    return d


def _manifest_int(s: DistilledSet, key: str, allowed) -> int | None:
    v = s.data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
        raise Mgd3Error(f"{s.path}/manifest.json: data.{key} {str(v)[:40]!r} is not a valid {key}")
    return v


def _channels_of(s: DistilledSet) -> int:
    from PIL import Image

    with Image.open(s.files[0]) as im:
        return 1 if im.mode in ("L", "I", "I;16", "1", "LA") else 3


def _resolution_of(s: DistilledSet) -> int:
    from PIL import Image

    with Image.open(s.files[0]) as im:
        return min(im.size)
