"""OUT and its checkpoints for `mgd3 pretrain`: per-epoch training state in OUT/.checkpoints
(saved, loaded with weights_only, checked against the config that made it), and deciding whether a
run starts afresh, continues, or clears OUT (--overwrite)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import torch

from mgd3 import safeio
from mgd3.errors import Mgd3Error
from mgd3.files import write_atomic
from mgd3.train.pretrain_settings import DIT_KEYS, OUTPUTS, VAE_KEYS, PretrainConfig

log = logging.getLogger(__name__)


class Checkpoints:
    """OUT/.checkpoints/{vae,dit}.pt (states) + {vae,dit}.json (epoch, config signature)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def meta(self, stage: str) -> dict | None:
        f = self.folder / f"{stage}.json"
        if not (f.is_file() and (self.folder / f"{stage}.pt").is_file()):
            return None
        try:
            meta = safeio.read_json(f, 1 << 20)
        except Mgd3Error:
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("signature"), dict) \
                or not isinstance(meta.get("epoch"), int):
            raise Mgd3Error(f"checkpoint {f} is unreadable; delete {self.folder} (or use --overwrite) to start "
                            "that stage afresh")
        return meta

    def load(self, stage: str) -> dict | None:
        """A checkpoint: plain tensors, numbers and lists only (weights_only=True, so a planted pickle
        cannot run); a truncated or foreign file is one error line."""
        if self.meta(stage) is None:
            return None
        f = self.folder / f"{stage}.pt"
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"model", "opt", "gen", "epoch", "step", "stats"} <= set(state):
                raise ValueError("not an mgd3 pretrain checkpoint")
        except Exception as e:  # noqa: BLE001  (truncated, garbage, or a pickle that is not plain data)
            first = safeio.load_error(e)
            raise Mgd3Error(f"checkpoint {f} is unreadable ({first}); delete {self.folder} (or use --overwrite) to "
                            "start that stage afresh") from None
        return state

    def add_run(self, run: dict) -> list[dict]:
        f = self.folder / "runs.json"
        try:
            runs = safeio.read_json(f, 16 << 20) if f.is_file() else []
        except Mgd3Error:
            runs = []
        runs = (runs if isinstance(runs, list) else []) + [run]
        self.folder.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(runs, indent=2))
        return runs

    def save(self, stage: str, state: dict, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, write in ((f"{stage}.pt", lambda p: torch.save(state, p)),
                            (f"{stage}.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))):
            write_atomic(self.folder / name, write)


@contextlib.contextmanager
def restoring(ckpt: Checkpoints, stage: str):
    """A checkpoint that loads but does not fit the model is one error line."""
    try:
        yield
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"checkpoint {ckpt.folder / (stage + '.pt')} does not fit this model ({first}); delete "
                        f"{ckpt.folder} (or use --overwrite) to start afresh") from None


def signature(cfg: PretrainConfig, keys: tuple[str, ...]) -> dict:
    """The config fields `keys` (VAE_KEYS or DIT_KEYS) that a checkpoint must match to continue."""
    return {k: getattr(cfg, k) for k in keys}


def _check_signature(meta: dict | None, cfg: PretrainConfig, keys: tuple[str, ...], out: Path) -> None:
    if meta is None:
        return
    want = json.loads(json.dumps(signature(cfg, keys), default=str))
    diff = [k for k in keys if meta["signature"].get(k) != want[k]]
    if diff:
        was = ", ".join(f"{k}={meta['signature'].get(k)!r} (now {want[k]!r})" for k in diff)
        raise Mgd3Error(f"{out} holds checkpoints of another configuration ({was}); "
                        "use the same options, another --out, or --overwrite")


def _written_by_pretrain(out: Path) -> bool:
    try:
        info = safeio.read_json(out / "mgd3.json", 1 << 20)
    except Mgd3Error:
        return False
    return isinstance(info, dict) and info.get("trained_by") == "mgd3 pretrain"


def prepare_out(cfg: PretrainConfig) -> tuple[Path, Checkpoints]:
    """Create OUT, clear it (--overwrite), or decide to continue from its checkpoints."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise Mgd3Error(f"output {out} exists and is not a folder")
    ckpt = Checkpoints(out / ".checkpoints")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if foreign and not ((out / "model_index.json").exists() or (out / ".checkpoints").exists()):
            raise Mgd3Error(f"output folder {out} is not empty and holds no mgd3 pretrain run "
                            f"(found {', '.join(foreign[:3])})")
        if cfg.overwrite and (out / "model_index.json").exists() and not (out / ".checkpoints").exists() \
                and not _written_by_pretrain(out):
            raise Mgd3Error(f"--overwrite: {out} holds a model mgd3 pretrain did not write (no .checkpoints, no "
                            "mgd3.json of mgd3 pretrain); mgd3 deletes only what it wrote; choose another --out")
        if cfg.overwrite:
            for name in OUTPUTS:  # model_index.json first: a crash mid-clean never leaves a 'finished' folder
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    vae_meta, dit_meta = ckpt.meta("vae"), ckpt.meta("dit")
    _check_signature(vae_meta, cfg, VAE_KEYS, out)
    if dit_meta is not None:
        _check_signature(dit_meta, cfg, DIT_KEYS, out)
    if (out / "model_index.json").exists():
        if dit_meta is None or (dit_meta.get("step", 0) >= cfg.train_steps if cfg.train_steps
                                else dit_meta["epoch"] >= cfg.epochs):
            done = f" ({dit_meta['epoch']} DiT epochs, {dit_meta.get('step')} steps)" if dit_meta else ""
            raise Mgd3Error(f"{out} already holds a finished model{done}; use --overwrite to train again, "
                            "or a larger --epochs / --train-steps to continue its training")
        log.info("continuing the finished model in %s after DiT epoch %d", out, dit_meta["epoch"])
        (out / "model_index.json").unlink()  # the folder is unfinished again until the new save
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Mgd3Error(f"cannot create output folder {out} ({e.strerror or e})") from None
    return out, ckpt
