"""Memory and throughput at scale: the float16 encoding cache, DataLoader workers for encoding,
and per-class latents that are read from the cache one class at a time."""

import json

import pytest
import torch

from conftest import run_cli
from mgd3.backends import load_backend
from mgd3.io.data import load_data
from mgd3.run.bookkeeping import NOT_IN_RUN_KEY
from mgd3.run.driver import distill
from mgd3.run.settings import DistillConfig
from mgd3.core.encode import CachedLatents, default_workers, encode_classes
from mgd3.errors import Mgd3Error
from mgd3.methods import ClassInfo, Context, SamplerConfig


def _setup(model, classes=("1", "2")):
    backend = load_backend(model)
    data = load_data("digits", resolution=8, channels=1, classes=list(classes))
    return backend, data


def test_cache_is_float16_on_disk_and_float32_in_memory(digits_model, tmp_path):
    backend, data = _setup(digits_model)
    fresh = encode_classes(backend, data, [0, 1], progress=False)
    files = sorted((tmp_path / "mgd3-cache" / "latents").rglob("*.pt"))
    assert len(files) == 2 and all(f.parent.name.endswith("-f16") for f in files)
    for f in files:
        assert torch.load(f, weights_only=True).dtype == torch.float16
    again = encode_classes(backend, data, [0, 1], progress=False)
    for c in (0, 1):
        assert fresh[c].dtype == again[c].dtype == torch.float32
        assert fresh[c].shape == (len(data.indices(c)), 4, 4, 4)
        assert torch.equal(fresh[c], again[c])  # a first and a cached run see the same latents
    # without the cache the latents are the same float16 values
    uncached = encode_classes(backend, data, [0], progress=False, use_cache=False)
    assert torch.equal(uncached[0], fresh[0])
    exact = backend.encode(torch.stack([x for x, _ in data.dataset(data.indices(0))]))  # float32
    torch.testing.assert_close(fresh[0], exact, atol=1e-2, rtol=1e-3)  # float16 rounding only


def test_an_old_float32_cache_is_not_read(digits_model, tmp_path):
    backend, data = _setup(digits_model, classes=("5",))
    old = tmp_path / "mgd3-cache" / "latents" / f"{backend.vae_fingerprint()}-{data.fingerprint()}" / "5.pt"
    old.parent.mkdir(parents=True)
    torch.save(torch.zeros(len(data.indices(0)), 4, 4, 4), old)
    lat = encode_classes(backend, data, [0], progress=False)[0]
    assert lat.abs().sum() > 0


def test_encoding_with_workers_gives_the_same_latents(digits_model):
    backend, data = _setup(digits_model)
    a = encode_classes(backend, data, [0, 1], progress=False, use_cache=False, batch_size=16, workers=0)
    b = encode_classes(backend, data, [0, 1], progress=False, use_cache=False, batch_size=16, workers=1)
    for c in (0, 1):
        assert torch.equal(a[c], b[c])


def test_a_worker_error_is_one_line(digits_model, monkeypatch):
    from mgd3.io.sources import ArrayDataset

    def broken(self, js):
        raise Mgd3Error("cannot read image x.png: broken")

    monkeypatch.setattr(ArrayDataset, "__getitems__", broken)
    backend, data = _setup(digits_model, classes=("1",))
    with pytest.raises(Mgd3Error) as e:
        encode_classes(backend, data, [0], progress=False, use_cache=False, workers=1)
    assert str(e.value) == "cannot read image x.png: broken"
    with pytest.raises(Mgd3Error, match="at least 0"):
        encode_classes(backend, data, [0], progress=False, workers=-1)


def test_context_latents_hold_one_class_at_a_time(digits_model):
    backend, data = _setup(digits_model, classes=("1", "2", "3"))
    classes = [ClassInfo(i, cid, data.class_names[i], i) for i, cid in enumerate(data.class_ids)]
    ctx = Context(backend, data, classes, 2, 0, SamplerConfig(steps=4), progress=False, encode_workers=0)
    lat = ctx.real_latents()
    assert isinstance(lat, CachedLatents) and list(lat) == [0, 1, 2]
    assert lat._last is None  # encoding kept nothing in memory
    eager = encode_classes(backend, data, [0, 1, 2], progress=False)
    for c in (0, 1, 2):
        assert torch.equal(lat[c], eager[c]) and lat._last[0] == c
    assert lat[2] is lat[2]  # the class read last is not read again
    assert ctx.real_latents() is lat


def test_default_workers():
    assert default_workers("cpu") == 0
    assert default_workers(torch.device("cpu")) == 0


def test_encode_workers_do_not_change_the_run(digits_model, tmp_path):
    assert "encode_workers" in NOT_IN_RUN_KEY
    out = tmp_path / "set"
    kw = dict(data="digits", model=str(digits_model), method="mgd3", ipc=2, classes=["4", "7"],
              progress=False, sampler=SamplerConfig(steps=4))
    distill(DistillConfig(out=str(out), encode_workers=0, **kw))
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--ipc", "2", "--classes", "4", "7",
                "--steps", "4", "--encode-workers", "1", "--out", tmp_path / "cli", "--quiet",
                env={"MGD3_CACHE_DIR": str(tmp_path / "cli-cache")})
    assert r.returncode == 0, r.stderr
    a = torch.load(out / "latents.pt", weights_only=True)["latents"]
    b = torch.load(tmp_path / "cli" / "latents.pt", weights_only=True)["latents"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    s = distill(DistillConfig(out=str(out), encode_workers=1, **kw))  # same settings: nothing to do
    assert s.get("complete")
    assert json.loads((out / "manifest.json").read_text())["config"]["encode_workers"] == 0
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--out", tmp_path / "bad",
                "--encode-workers", "-1", "--quiet")
    assert r.returncode == 2 and "--encode-workers must be at least 0" in r.stderr


def test_autocast_encodings_have_their_own_cache_folder(digits_model, tmp_path):
    data = load_data("digits", resolution=8, channels=1, classes=["3"])
    encode_classes(load_backend(digits_model), data, [0], progress=False)
    encode_classes(load_backend(digits_model, precision="bf16"), data, [0], progress=False)
    folders = sorted(f.parent.name for f in (tmp_path / "mgd3-cache" / "latents").rglob("*.pt"))
    assert len(folders) == 2 and folders[0].endswith("-f16") and folders[1].endswith("-f16-bf16")
