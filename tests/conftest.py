import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from mgd3.testing import build_dit_folder
from reference_models import build_reference_dit, load_raw_transformer

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


@contextmanager
def _single_torch_thread():
    """Torch on one thread inside the block; the thread count it had is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread, as the subprocesses had (OMP_NUM_THREADS=1): a shared CPU stalls otherwise.
    A module takes it for every test with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with _single_torch_thread():
        yield


@pytest.fixture(scope="module")
def module_one_thread():
    """`one_thread` held over a whole module, its module-scoped fixtures included (tiny models gain
    nothing from threads; on a busy CPU waiting threads cost seconds per op). A module takes it with
    `pytestmark = pytest.mark.usefixtures("module_one_thread")`; a module-scoped fixture that must
    be built on one thread also names it."""
    with _single_torch_thread():
        yield


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny learned-sigma reference DiT (`build_reference_dit`: 3-channel 16 px images, 4×8×8
    latents, 10 classes, β_end 0.001), built once per module. A module that compares another DiT
    defines its own `dit_folder`; `dit` and `raw_transformer` then load that one."""
    return build_reference_dit(tmp_path_factory.mktemp("ref") / "dit")


@pytest.fixture(scope="module")
def dit(dit_folder):
    """The module's `dit_folder` loaded through mgd3's backend."""
    from mgd3.backends import load_backend

    return load_backend(dit_folder)


@pytest.fixture(scope="module")
def raw_transformer(dit_folder):
    """The same weights, loaded by diffusers alone (the oracles never touch mgd3's backend)."""
    return load_raw_transformer(dit_folder)


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
