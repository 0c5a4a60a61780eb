import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mgd3.testing import build_dit_folder

ROOT = Path(__file__).resolve().parents[1]
# the fastest in-process distill of the tiny models (`digits_model`)
TINY_STEPS = ["--steps", "2", "--quiet", "--device", "cpu"]
TINY_DISTILL = [*TINY_STEPS, "--method", "plain"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own encoding cache and no Hugging Face network access."""
    monkeypatch.setenv("MGD3_CACHE_DIR", str(tmp_path / "mgd3-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A tiny learned-sigma DiT pipeline for 8×8 grayscale digits, names "0".."9"."""
    return build_dit_folder(tmp_path_factory.mktemp("models") / "dit-digits", num_classes=10,
                            image_channels=1, resolution=8, class_names=[str(i) for i in range(10)])


def run_cli(*args, env=None, check=False):
    """Run the real `mgd3` CLI in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "mgd3", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"mgd3 {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r


@pytest.fixture
def one_thread():
    """One torch thread, as the subprocesses had (OMP_NUM_THREADS=1): a shared CPU stalls otherwise.
    A module takes it for every test with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def distill_digits_set(model, out: Path, ipc: int = 2) -> Path:
    """A real distilled set, made in-process (`mgd3.cli.main`): digit classes 0 and 1 × `ipc`
    (tiny DiT, 2 steps, method plain)."""
    from mgd3.cli import main

    assert main(["distill", "--data", "digits", "--classes", "0", "1", "--ipc", str(ipc), "--model", str(model),
                 "--out", str(out), *TINY_DISTILL]) == 0
    return out


@pytest.fixture(scope="module")
def base_set(digits_model, tmp_path_factory):
    """A real distilled set made once per test module: 2 digit classes × IPC 2 (`distill_digits_set`).
    A module that needs another one defines its own `base_set`."""
    return distill_digits_set(digits_model, tmp_path_factory.mktemp("set") / "set")


@pytest.fixture
def a_set(base_set, tmp_path):
    """A copy of the module's `base_set` that the test may damage."""
    dst = tmp_path / "set"
    shutil.copytree(base_set, dst)
    return dst


def edit_manifest(root: Path, fn) -> None:
    """Rewrite a set's manifest.json through `fn` (which edits the manifest in place, or returns a new one)."""
    f = root / "manifest.json"
    m = json.loads(f.read_text())
    m = fn(m) or m
    f.write_text(json.dumps(m))


def distill_args(model, out, *more) -> list:
    """argv of an in-process distill of one image of digit class 0 (tiny DiT, 2 steps, method plain)."""
    return ["distill", "--data", "digits", "--classes", "0", "--ipc", "1", "--model", model, "--out", out,
            *TINY_DISTILL, *more]
