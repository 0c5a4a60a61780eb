import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgd3.testing import build_dit_folder

ROOT = Path(__file__).resolve().parents[1]


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
