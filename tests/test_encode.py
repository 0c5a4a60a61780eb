"""Encoding stage: the fast path gives the latents of the plain one (to float rounding), and an
unusable cache file is reported and rebuilt, never fatal and never executed."""

import logging
import shutil
import pickle

import pytest
import torch

from mgd3.backends import load_backend
from mgd3.io.data import load_data
from mgd3.run.driver import shipped_model
from mgd3.core.encode import cache_root, encode_classes


def test_fast_encoding_gives_the_same_latents(tmp_path):
    backend = load_backend(shipped_model("fashion-mnist"))
    data = load_data("fashion-mnist", "train", resolution=28, channels=1)
    sub = {0: data.indices(0)[:150], 7: data.indices(7)[:40]}
    for batch_size in (64, 256):
        got = encode_classes(backend, data, [0, 7], batch_size=batch_size, progress=False, indices=sub,
                             use_cache=False)
        _check_against_plain_encoding(backend, data, sub, got)


def _check_against_plain_encoding(backend, data, sub, got):
    for c, idx in sub.items():
        x = torch.stack([img for img, _ in data.dataset(idx)])
        with torch.no_grad():
            ref = torch.cat([backend.encode(x[s:s + 64]) for s in range(0, len(x), 64)])
        assert got[c].shape == ref.shape and got[c].dtype == torch.float32
        # float16 storage: one rounding of the float16 grid at most, from float32 rounding upstream
        torch.testing.assert_close(got[c], ref.half().float(), rtol=1e-3, atol=1e-3)
        assert (got[c] == ref.half().float()).float().mean() > 0.99


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "latents").rglob("*.pt"))


def _truncate(f):
    f.write_bytes(f.read_bytes()[:100])


def _pickle_payload(f):
    class Boom:
        def __reduce__(self):
            return (open, (str(f.parent / "PWNED"), "w"))

    f.write_bytes(pickle.dumps(Boom()))


def _wrong_shape(f):
    torch.save(torch.zeros(3, 4, 2, 2, dtype=torch.float16), f)


def _nan(f):
    t = torch.load(f, weights_only=True)
    t[0, 0, 0, 0] = float("nan")
    torch.save(t, f)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage,lazy", [(_truncate, False), (_pickle_payload, True), (_wrong_shape, True),
                                         (_nan, False)])
def test_unusable_cache_file_is_reported_and_rebuilt(digits_model, tmp_path, caplog, damage, lazy):
    backend = load_backend(digits_model)
    data = load_data("digits", classes=["0", "1"], resolution=8, channels=1)
    first = {c: v.clone() for c, v in encode_classes(backend, data, [0, 1], progress=False,
                                                     cache_dir=tmp_path / "cache").items()}
    files = _cache_files(tmp_path)
    assert len(files) == 2
    damage(files[0])
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        again = encode_classes(backend, data, [0, 1], progress=False, cache_dir=tmp_path / "cache", lazy=lazy)
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warned) == 1 and str(files[0]) in warned[0]
    assert not (files[0].parent / "PWNED").exists()
    for c in (0, 1):
        assert torch.equal(again[c], first[c])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgd3"):  # repaired: the next run reads it quietly
        third = encode_classes(backend, data, [0, 1], progress=False, cache_dir=tmp_path / "cache")
    assert not [r for r in caplog.records if "unusable" in r.getMessage()]
    assert torch.equal(third[0], first[0])


def test_truncated_cache_file_through_the_cli(digits_model, tmp_path, monkeypatch, capsys):
    from mgd3.cli import main

    monkeypatch.setenv("MGD3_CACHE_DIR", str(tmp_path / "cache"))
    args = ["distill", "--data", "digits", "--model", str(digits_model), "--classes", "0", "1", "--ipc", "2",
            "--steps", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    files = sorted((cache_root() / "latents").rglob("*.pt"))
    assert files
    for f in files:
        _truncate(f)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "manifest.json").is_file()
    assert (tmp_path / "a" / "latents.pt").read_bytes() == (tmp_path / "b" / "latents.pt").read_bytes()
    assert all(torch.load(f, weights_only=True).dtype == torch.float16 for f in files)  # rebuilt


def test_no_cache_encodes_again_and_writes_nothing(digits_model, tmp_path, monkeypatch):
    from mgd3.cli import main

    monkeypatch.setenv("MGD3_CACHE_DIR", str(tmp_path / "cache"))
    args = ["distill", "--data", "digits", "--model", str(digits_model), "--classes", "0", "1", "--ipc", "2",
            "--steps", "2", "--quiet", "--method", "mgd3", "--select-from", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    files = sorted((cache_root() / "latents").rglob("*.pt"))
    assert files
    for f in files:  # were the cache read, the modes (and so the images) would change
        torch.save(torch.zeros_like(torch.load(f, weights_only=True)), f)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert main([*args, "--no-cache", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "latents.pt").read_bytes() == (tmp_path / "b" / "latents.pt").read_bytes()
    assert sorted((cache_root() / "latents").rglob("*.pt")) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    shutil.rmtree(cache_root() / "latents")
    assert main([*args, "--no-cache", "--out", str(tmp_path / "c")]) == 0
    assert not (cache_root() / "latents").exists()
    assert (tmp_path / "a" / "latents.pt").read_bytes() == (tmp_path / "c" / "latents.pt").read_bytes()
