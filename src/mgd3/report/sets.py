"""Reading the distilled sets a report compares: manifests (through `mgd3.io.set_reader.read_set`), the
model that made each set (checked, never downloaded) and the evaluations beside it (eval.json,
evals/*.json)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from mgd3.errors import Mgd3Error

log = logging.getLogger(__name__)


@dataclass
class SetInfo:
    path: Path
    label: str  # unique short name in the report
    manifest: dict
    evals: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # manifest path -> checked file inside the set

    @property
    def method(self) -> str:
        return str(self.manifest.get("method"))

    @property
    def ipc(self) -> int:
        """The manifest's IPC, else the largest number of images of a class."""
        if self.manifest.get("ipc"):
            return int(self.manifest["ipc"])
        counts: dict[str, int] = {}
        for im in self.manifest.get("images") or []:
            counts[str(im.get("class_id"))] = counts.get(str(im.get("class_id")), 0) + 1
        return max(counts.values(), default=0)

    @property
    def data_name(self) -> str | None:
        return (self.manifest.get("data") or {}).get("name")


def set_model(s: "SetInfo") -> str:
    """The model folder that made the set, checked: a local folder or a repo id already in the
    Hugging Face cache (a set's contents never start a download), whose fingerprint is the one the
    manifest recorded (a model swapped in at that path is refused, not used)."""
    from mgd3.files import folder_fingerprint as model_fingerprint

    m = s.manifest
    rec = m.get("model") or {}
    model = rec.get("path") or (m.get("config") or {}).get("model")
    if not model or not isinstance(model, str):
        raise Mgd3Error(f"{s.path}/manifest.json does not name its model")
    p = Path(model).expanduser()
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001  (not a repo id, not cached)
            raise Mgd3Error(f"{s.path}/manifest.json names model {model[:120]!r}, which is not a local folder nor in "
                            "the Hugging Face cache; report never downloads what a set names") from None
    want = rec.get("fingerprint")
    if want is None:
        log.warning("%s/manifest.json records no model fingerprint; %s is used unchecked", s.path, p)
    elif model_fingerprint(p) != want:
        raise Mgd3Error(f"the model at {p} is not the one that made {s.path} (its fingerprint {model_fingerprint(p)} "
                        f"!= {want} in the manifest); put that model back there")
    return str(p)


def _read_json(f: Path) -> dict:
    from mgd3 import safeio

    return safeio.read_json_object(f, 16 << 20, str(f), "evaluation result")


def _eval_key(r: dict) -> tuple:
    p = r.get("protocol") or {}
    return (p.get("name"), r.get("arch"), p.get("epochs"), tuple(r.get("seeds") or ()))


def _number(v, what: str, f: Path, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Mgd3Error(f"{f}: {what} must be a finite number, got {str(v)[:40]!r}")


def _check_eval(r: dict, f: Path) -> None:
    """The numbers a report reads from an eval.json are numbers."""
    _number(r.get("mean"), "mean", f, optional=False)
    _number(r.get("std"), "std", f)
    _number(r.get("train_seconds"), "train_seconds", f)
    for key in ("set", "protocol", "references"):
        if r.get(key) is not None and not isinstance(r[key], dict):
            raise Mgd3Error(f"{f}: {key} must be a mapping")
    refs = r.get("references") or {}
    for name in ("random_real", "full"):
        ref = refs.get(name)
        if ref is None:
            continue
        if not isinstance(ref, dict):
            raise Mgd3Error(f"{f}: references.{name} must be a mapping")
        _number(ref.get("mean"), f"references.{name}.mean", f)
        _number(ref.get("ipc"), f"references.{name}.ipc", f)
    _number((r.get("set") or {}).get("ipc"), "set.ipc", f)
    if r.get("seeds") is not None and not isinstance(r["seeds"], list):
        raise Mgd3Error(f"{f}: seeds must be a list")


def read_evals(root: Path) -> list[dict]:
    """DIR/eval.json (the latest evaluation) and DIR/evals/*.json (one per protocol/arch/epochs),
    without duplicates; each with "file" added."""
    from mgd3.io.store import inside

    out, seen = [], set()
    files = [root / "eval.json"] + sorted((root / "evals").glob("*.json"))
    for f in files:
        if not f.exists():
            continue  # a FIFO or device is refused by the reader, not skipped
        inside(root, str(f.relative_to(root)), "evaluation results")  # no symlink out of the set (evals/ too)
        r = _read_json(f)
        if not str(r.get("format", "")).startswith("mgd3-eval/") or "mean" not in r:
            raise Mgd3Error(f"{f} is not an mgd3 evaluation result (format {str(r.get('format'))[:40]!r})")
        _check_eval(r, f)
        if _eval_key(r) in seen:
            continue
        seen.add(_eval_key(r))
        out.append({**r, "file": str(f)})
    return out


def read_sets(dirs: list[str], data: str | None = None) -> list[SetInfo]:
    """The distilled sets (manifest + evaluations, read by `mgd3.io.set_reader.read_set`); one data set only."""
    from mgd3.io.set_reader import read_set

    sets: list[SetInfo] = []
    seen: set[Path] = set()
    for d in dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise Mgd3Error(f"distilled set {d} does not exist or is not a folder")
        if root.resolve() in seen:
            raise Mgd3Error(f"distilled set {d} is given twice")
        seen.add(root.resolve())
        ds = read_set(root, allow_image_folder=False)
        m = ds.manifest
        for key in ("data", "model", "config", "timing_s"):
            if m.get(key) is not None and not isinstance(m[key], dict):
                raise Mgd3Error(f"{root}/manifest.json: {key} must be a mapping")
        if (m.get("data") or {}).get("name") is not None and not isinstance(m["data"]["name"], str):
            raise Mgd3Error(f"{root}/manifest.json: data.name must be a string")
        files = {str(im["path"]): f for im, f in zip(m["images"], ds.files)}
        sets.append(SetInfo(root, "", m, read_evals(root), files))
    names = {s.data_name for s in sets}
    if len(names) > 1:
        listing = ", ".join(f"{s.path} ({s.data_name})" for s in sets)
        raise Mgd3Error(f"the sets are of different datasets and cannot share a report: {listing}")
    if data is None and names == {None}:
        raise Mgd3Error("the manifests do not name their data set: pass --data")
    used: dict[str, int] = {}
    for s in sets:  # unique labels: the folder name, numbered when two folders share it
        base = s.path.resolve().name or "set"
        used[base] = used.get(base, 0) + 1
        s.label = base if used[base] == 1 else f"{base}-{used[base]}"
    return sets
