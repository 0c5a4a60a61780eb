"""Issue 32, hostile input round 2: resource bombs and broken networks, through the real CLI.

- A 1.7 KB latents.pt holding a stride-0 view of 4x4x40000x40000 is refused before `.float()`
  would materialise 100 GB; an evaluation resolution that does not fit in memory is refused
  before the test set is allocated.
- torch's allocation `RuntimeError` (not a `MemoryError`) is one line naming where it happened,
  with the batch-size hint only where the batch size decides.
- A VAE that encodes to NaN stops before k-means (every method that encodes); a VAE whose decoder
  gives another channel count than its encoder takes, and a transformer config with a size of
  -3, are refused at load, before anything is built or written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clitools import ok, refused
from conftest import TINY_STEPS

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with(digits_model, tmp_path, edit) -> Path:
    m = tmp_path / "model"
    shutil.copytree(digits_model, m)
    edit(m)
    return m


def edit_config(m: Path, sub: str, **changes) -> None:
    f = m / sub / "config.json"
    d = json.loads(f.read_text())
    d.update(changes)
    f.write_text(json.dumps(d))


def distill(model, out, method="plain"):
    return ["distill", "--data", "digits", "--classes", "0", "1", "--ipc", "1", "--model", model, "--out", out,
            "--method", method, *TINY_STEPS]


# --------------------------------------------------------------------------- bombs


def test_a_stride_0_latents_file_is_refused_before_it_is_materialised(a_set, tmp_path, capsys):
    from mgd3.api import load_set
    from mgd3.errors import Mgd3Error

    paths = [im["path"] for im in json.loads((a_set / "manifest.json").read_text())["images"]]
    bomb = torch.zeros(1).expand(4, 4, 40000, 40000)  # 25.6 G elements over 1 stored
    torch.save({"latents": bomb, "paths": paths}, a_set / "latents.pt")
    assert (a_set / "latents.pt").stat().st_size < 4096
    line = refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet", "--device", "cpu"],
                   "holds a view of 25600000000 elements over 1 stored")
    assert "latents.pt" in line
    with pytest.raises(Mgd3Error, match="holds a view"):
        load_set(a_set)


def test_evaluate_resolution_that_does_not_fit_is_refused_before_allocating(a_set, capsys, monkeypatch):
    import mgd3.config

    monkeypatch.setattr(mgd3.config, "available_memory", lambda: 8 << 30)
    refused(capsys, ["evaluate", a_set, "--resolution", "4096", "--epochs", "1", "--seeds", "0", "--device", "cpu",
                     "--quiet"], "at 4096x4096 pixels needs about")
    assert not (a_set / "eval.json").exists()


@pytest.mark.parametrize("where, hint", [("mgd3.io.store.write_manifest", "asks for more memory"),
                                         ("mgd3.core.sampling.predict_x0", "smaller --batch-size")])
def test_torch_allocation_error_is_one_line_with_the_right_hint(digits_model, tmp_path, capsys, monkeypatch, where,
                                                                 hint):
    import importlib

    mod, name = where.rsplit(".", 1)
    mod = importlib.import_module(mod)
    if not hasattr(mod, name):
        pytest.skip(f"{where} is not there")

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 109951162777600 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(mod, name, boom)
    out = tmp_path / "o"
    line = refused(capsys, distill(digits_model, out), "out of memory allocating 102400.0 GiB", out)
    assert hint in line


# --------------------------------------------------------------------------- broken networks


@pytest.mark.parametrize("path, hint", [
    ("mgd3/evaluation/train.py", "smaller --batch-size"), ("mgd3/train/dit_stage.py", "smaller --batch-size"),
    ("mgd3/train/vae_stage.py", "smaller --batch-size"), ("mgd3/core/encode.py", "smaller --batch-size"),
    ("mgd3/methods/mgd3.py", "smaller --batch-size"), ("mgd3/io/store.py", "asks for more memory"),
])
def test_the_allocation_hint_knows_every_stage_that_holds_a_batch(path, hint):
    """The hint follows the package layout: a failed allocation in a module that holds a batch (its
    frame innermost) says to lower --batch-size; elsewhere, that an input asks for too much."""
    from mgd3.faults import allocation_line

    code = compile("raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')", f"/site/{path}", "exec")
    try:
        exec(code, {})
    except RuntimeError as e:
        line = allocation_line(e)
    assert hint in line and f"in {path}:1" in line, line


@pytest.mark.parametrize("method", ["kmeans-real", "mgd3", "d4m"])
def test_nan_encoder_latents_stop_before_kmeans(digits_model, tmp_path, capsys, method):
    from safetensors.torch import load_file, save_file

    def edit(m):
        f = m / "vae" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(f))
        key = next(k for k in sd if k.startswith("encoder.conv_in.weight"))
        sd[key] = torch.full_like(sd[key], float("nan"))
        save_file(sd, str(f))

    out = tmp_path / "o"
    line = refused(capsys, distill(model_with(digits_model, tmp_path, edit), out, method), "NaN", out)
    assert "the VAE of" in line and "Input X contains NaN" not in line
    assert not (out / "images").exists() or not any((out / "images").rglob("*.png"))


def test_vae_with_other_output_channels_is_refused_at_load(digits_model, tmp_path, capsys):
    m = model_with(digits_model, tmp_path, lambda m: edit_config(m, "vae", out_channels=4))
    out = tmp_path / "o"
    refused(capsys, distill(m, out), "in_channels must equal out_channels", out)
    assert not out.exists()


@pytest.mark.parametrize("sub, key, value", [("transformer", "num_layers", -3), ("transformer", "attention_head_dim", 0),
                                             ("transformer", "patch_size", 1.5), ("vae", "block_out_channels", [8, -8]),
                                             ("transformer", "num_attention_heads", "two"),
                                             ("vae", "layers_per_block", 10**9)])
def test_absurd_model_sizes_are_refused_before_building(digits_model, tmp_path, capsys, sub, key, value):
    m = model_with(digits_model, tmp_path, lambda m: edit_config(m, sub, **{key: value}))
    out = tmp_path / "o"
    line = refused(capsys, distill(m, out), f"{key} must be a positive integer", out)
    assert f"{sub}/config.json" in line
    assert not out.exists()


def test_a_sound_model_still_loads(digits_model, tmp_path, capsys):
    ok(capsys, distill(digits_model, tmp_path / "o"))


def test_an_empty_list_of_sizes_is_refused(digits_model, tmp_path, capsys):
    """Found by test_fuzz_structure (deep profile): block_out_channels [] broke the size estimate."""
    m = model_with(digits_model, tmp_path, lambda m: edit_config(m, "vae", block_out_channels=[]))
    refused(capsys, distill(m, tmp_path / "o"), "block_out_channels must not be empty")


@pytest.mark.parametrize("value, msg", [("{bogus: 1}", "unknown protocol option 'bogus'"),
                                        ("{batch_size: x}", "batch_size must be an integer"),
                                        ("{lr: .nan}", "--option lr must be a finite number")])
def test_many_classes_overrides_get_the_option_checks(a_set, capsys, value, msg):
    refused(capsys, ["evaluate", a_set, "--device", "cpu", "--quiet", "--option", f"many_classes={value}"], msg)
    assert not (a_set / "eval.json").exists()


@pytest.mark.parametrize("edit, msg", [
    (lambda u, dd: u.pop("model_channels"), "unet_config.params has no model_channels"),
    (lambda u, dd: u.update(channel_mult=5), "channel_mult must be a list of integers"),
    (lambda u, dd: u.update(num_res_blocks=10**9), "num_res_blocks must be a positive integer up to 16"),
    (lambda u, dd: u.update(num_res_blocks=1e9), "num_res_blocks must be a positive integer"),
    (lambda u, dd: u.update(transformer_depth=10**9), "transformer_depth must be a positive integer"),
    (lambda u, dd: dd.update(ch_mult=[]), "ch_mult must not be empty"),
])
def test_convert_ldm_config_sizes_are_checked_before_building(tmp_path, capsys, edit, msg):
    import copy

    import yaml
    from test_convert import CONFIG

    cfg = copy.deepcopy(CONFIG)
    p = cfg["model"]["params"]
    edit(p["unet_config"]["params"], p["first_stage_config"]["params"]["ddconfig"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "m.ckpt").write_bytes(b"junk")
    refused(capsys, ["convert-ldm", tmp_path / "m.ckpt", "--config", tmp_path / "c.yaml", "--out", tmp_path / "o"],
            msg)
    assert not (tmp_path / "o").exists()


def test_a_refused_pickle_never_advises_weights_only_false(a_set, tmp_path, capsys):
    import os

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"latents": Payload()}, a_set / "latents.pt")
    line = refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet", "--device", "cpu"], "latents.pt")
    assert "weights_only=False" not in line and "never unpickles" in line
    (tmp_path / "m.ckpt").write_bytes((a_set / "latents.pt").read_bytes())
    from test_convert import CONFIG
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    line = refused(capsys, ["convert-ldm", tmp_path / "m.ckpt", "--config", tmp_path / "c.yaml", "--out",
                            tmp_path / "o"], "m.ckpt")
    assert "weights_only=False" not in line and "never unpickles" in line
