"""Crash-safe resume of `mgd3 distill`, as real processes on the tiny DiT: a run killed with
SIGKILL after its first finished batch leaves no manifest, and the same command finishes it
into the set an uninterrupted run writes, bit for bit. A complete set is left as it is; other
settings in the same folder are refused (naming the field) unless --overwrite."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# batch size 1: six batches of 100 steps, so a run is still going when its first shard appears
SET = ["--data", "digits", "--method", "mgd3", "--ipc", "3", "--classes", "0", "1", "--steps", "100",
       "--batch-size", "1", "--seed", "0", "--quiet", "--device", "cpu"]


def _cmd(model, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mgd3", "distill", "--model", str(model), "--out", str(out), *SET, *map(str, extra)]


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MGD3_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")


def _run(model, out, cache, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(model, out, *extra), capture_output=True, text=True, env=_env(cache), cwd=ROOT,
                          timeout=300)


def _images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def _one_error(r) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("mgd3: error: "), r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def _reference_run(digits_model, tmp_path_factory):
    """An uninterrupted run, started at once (it runs while the first test starts its own)."""
    tmp = tmp_path_factory.mktemp("resume-reference")
    p = subprocess.Popen(_cmd(digits_model, tmp / "set"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env(tmp / "cache"), cwd=ROOT)
    done = {}
    yield p, tmp / "set", done
    if not done:
        p.kill()
        p.communicate()


@pytest.fixture
def reference(_reference_run) -> Path:
    """The complete set of the uninterrupted run (waits for it)."""
    p, out, done = _reference_run
    if not done:
        done["stderr"] = p.communicate(timeout=300)[1]
    assert p.returncode == 0, done["stderr"]
    return out


@pytest.mark.slow
def test_killed_run_resumes_into_the_uninterrupted_set(digits_model, _reference_run, tmp_path, request):
    out, cache = tmp_path / "set", tmp_path / "cache"
    p = subprocess.Popen(_cmd(digits_model, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=_env(cache), cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not list((out / ".partial").glob("*.pt")):
            assert p.poll() is None, f"the run ended before its first batch was done:\n{p.stderr.read()}"
            assert time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert (out / ".mgd3-run.json").is_file()
    kept = len(list((out / ".partial").glob("*.pt")))
    assert 1 <= kept < 6, "killed too late to leave an unfinished run"

    r = _run(digits_model, out, cache)
    assert r.returncode == 0, r.stderr
    assert f"resumed: {kept} images were already written by an interrupted run" in r.stdout
    assert "wrote 6 images" in r.stdout
    assert not (out / ".partial").exists()
    assert not list(out.rglob("*.tmp"))

    reference = request.getfixturevalue("reference")
    assert _images(out) == _images(reference) and len(_images(out)) == 6
    a, b = (torch.load(d / "latents.pt", weights_only=True) for d in (out, reference))
    assert torch.equal(a["latents"], b["latents"]) and a["paths"] == b["paths"] and a["labels"] == b["labels"]
    assert (out / "grid.png").read_bytes() == (reference / "grid.png").read_bytes()
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert m["images"] == ref["images"] and m["method_info"] == ref["method_info"]
    assert m["machine"]["resumed_images"] == kept and ref["machine"]["resumed_images"] == 0


def test_rerunning_a_complete_set_does_nothing(digits_model, reference, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.rglob("*") if p.is_file()}
    r = _run(digits_model, reference, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert f"{reference} already holds the complete set (6 images) for these settings; nothing to do" in r.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in reference.rglob("*") if p.is_file()} == before


def test_other_settings_in_the_same_folder_are_refused(digits_model, reference, tmp_path):
    manifest = (reference / "manifest.json").read_bytes()
    line = _one_error(_run(digits_model, reference, tmp_path / "cache", "--seed", "1"))
    assert f"output folder {reference} holds a run with other settings (seed: 0 there, 1 now)" in line
    assert "--overwrite" in line
    assert (reference / "manifest.json").read_bytes() == manifest


def test_overwrite_replaces_a_run_with_other_settings(digits_model, reference, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(reference, out)
    (out / "images" / "001-1" / "2.png").unlink()  # overwrite does not care what is there
    r = _run(digits_model, out, tmp_path / "cache", "--seed", "1", "--steps", "4", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "wrote 6 images" in r.stdout and "resumed" not in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 1 and m["config"]["sampler"]["steps"] == 4 and len(m["images"]) == 6
    assert json.loads((out / ".mgd3-run.json").read_text())["key"]["seed"] == 1
    assert _images(out).keys() == _images(reference).keys() and _images(out) != _images(reference)
