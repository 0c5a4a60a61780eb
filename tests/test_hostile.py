"""Hostile and careless input to every sub-command, through the real CLI in-process
(`mgd3.cli.main`): no code runs from a planted pickle, nothing is read outside a set, no user file
is deleted, no silent garbage, and one `mgd3: error:` line (exit 2) instead of a traceback.

Each case is one item of issue 19's list; the tiny models and sets are made once per module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clitools import ok, refused
from conftest import TINY_DISTILL, distill_args, distill_digits_set, edit_manifest
from mgd3.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_PRETRAIN = ["--data", "digits", "--limit", "64", "--vae-epochs", "1", "--epochs", "1", "--size", "tiny",
                 "--max-steps", "1", "--batch-size", "32", "--vae-width", "8", "--vae-levels", "2", "--quiet",
                 "--device", "cpu"]


class Payload:
    """Unpickling this creates `marker`: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(f: Path, marker: Path, extra: dict | None = None) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"payload": Payload(marker), **(extra or {})}, f)
    with pytest.raises(Exception):  # the file really is a payload: a plain load refuses it
        torch.load(f, weights_only=True)


@pytest.fixture(scope="module")
def base_set(digits_model, tmp_path_factory):
    """A real distilled set: 2 digit classes × IPC 3 (tiny DiT, 2 steps)."""
    return distill_digits_set(digits_model, tmp_path_factory.mktemp("hostile") / "set", ipc=3)


# --------------------------------------------------------------------------- 1. no code from files


def test_pretrain_checkpoint_pickle_does_not_run(tmp_path, capsys):
    from mgd3.train.checkpoints import signature
    from mgd3.train.pretrain_settings import VAE_KEYS, PretrainConfig

    out, marker = tmp_path / "m", tmp_path / "PWNED"
    cfg = PretrainConfig(data="digits", out=str(out), limit=64, vae_width=8, vae_levels=2)
    (out / ".checkpoints").mkdir(parents=True)
    plant(out / ".checkpoints" / "vae.pt", marker)
    (out / ".checkpoints" / "vae.json").write_text(json.dumps({"epoch": 1, "signature": signature(cfg, VAE_KEYS)}))
    refused(capsys, ["pretrain", *TINY_PRETRAIN, "--out", out], "is unreadable")
    assert not marker.exists()


def test_pretrain_truncated_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "m"
    ok(capsys, ["pretrain", *TINY_PRETRAIN, "--out", out])
    f = out / ".checkpoints" / "vae.pt"
    f.write_bytes(f.read_bytes()[:100])
    (out / "model_index.json").unlink()  # unfinished again: it continues from the checkpoints
    refused(capsys, ["pretrain", *TINY_PRETRAIN, "--out", out], "checkpoint")


def test_teacher_cache_pickle_does_not_run_and_is_rebuilt(a_set, tmp_path, capsys, caplog, monkeypatch):
    cache = tmp_path / "cache"
    argv = ["evaluate", a_set, "--protocol", "soft", "--arch", "convnet-3", "--epochs", "1", "--teacher-epochs", "1",
            "--seeds", "0", "--device", "cpu", "--quiet", "--cache-dir", cache, "--out", tmp_path / "e.json"]
    ok(capsys, argv)
    teachers = list((cache / "eval" / "teachers").glob("*.pt"))
    assert teachers
    marker = tmp_path / "PWNED"
    for f in teachers:
        plant(f, marker)
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, argv)
    assert not marker.exists()
    assert any("training it again" in r.getMessage() for r in caplog.records)
    for f in teachers:  # rebuilt: plain data again
        torch.load(f, weights_only=True)


def test_shard_pickle_does_not_run_and_the_batch_is_made_again(digits_model, tmp_path, capsys, caplog):
    out, marker = tmp_path / "o", tmp_path / "PWNED"
    ok(capsys, distill_args(digits_model, out))
    (out / "manifest.json").unlink()  # an interrupted run: the run file stays, the shard is planted
    plant(out / ".partial" / "00000-000000-000001.pt", marker)
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, distill_args(digits_model, out))
    assert not marker.exists()
    assert (out / "manifest.json").is_file()
    assert any("generating that batch again" in r.getMessage() for r in caplog.records)


def test_encoding_cache_pickle_does_not_run(digits_model, tmp_path, capsys, monkeypatch):
    cache, marker = tmp_path / "cache", tmp_path / "PWNED"
    argv = ["distill", "--data", "digits", "--classes", "0", "--ipc", "1", "--model", digits_model,
            "--steps", "2", "--quiet", "--device", "cpu", "--cache-dir", cache]
    ok(capsys, [*argv, "--out", tmp_path / "a"])
    files = list((cache / "latents").rglob("*.pt"))
    assert files
    for f in files:
        plant(f, marker)
    try:
        code = main([str(a) for a in [*argv, "--out", tmp_path / "b"]])
    finally:
        assert not marker.exists()  # whatever happens, the payload never runs
    assert code == 0  # the planted entries are reported and encoded again (mgd3.core.encode)
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_latents_pickle_in_a_set_does_not_run(a_set, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    plant(a_set / "latents.pt", marker)
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet", "--embedding", "pca"],
            "is not a readable mgd3 latents file")
    assert not marker.exists()


def test_garbage_latents_is_one_line(a_set, tmp_path, capsys):
    (a_set / "latents.pt").write_bytes(os.urandom(2000))
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet", "--embedding", "pca"], "latents")


def test_no_unsafe_load_left_in_the_source():
    src = Path(__file__).resolve().parents[1] / "src"
    hits = [f"{f}:{i}" for f in src.rglob("*.py") for i, line in enumerate(f.read_text().splitlines(), 1)
            if "weights_only=False" in line]
    assert hits == []


# --------------------------------------------------------------------------- 2. containment


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_manifest_paths_stay_inside_the_set(a_set, tmp_path, capsys, kind):
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    if kind == "dotdot":
        edit_manifest(a_set, lambda m: m["images"][0].update(path="../secret.png"))
    elif kind == "absolute":
        edit_manifest(a_set, lambda m: m["images"][0].update(path=str(outside)))
    else:
        first = a_set / json.loads((a_set / "manifest.json").read_text())["images"][0]["path"]
        first.unlink()
        first.symlink_to(outside)
    msg = "leaves the set folder" if kind != "symlink" else "leads out of the set folder"
    refused(capsys, ["evaluate", a_set, "--epochs", "1", "--seeds", "0", "--device", "cpu", "--quiet"], msg)
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet"], msg)


def test_report_does_not_copy_a_grid_that_leaves_the_set(a_set, tmp_path, capsys):
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(secret)
    (a_set / "grid.png").unlink()
    (a_set / "grid.png").symlink_to(secret)
    out = tmp_path / "r"
    ok(capsys, ["report", a_set, "--out", out, "--quiet", "--embedding", "pca", "--no-evaluate"])
    (grid,) = out.glob("grid-*.png")  # drawn from the set's own checked images, never from grid.png
    assert grid.read_bytes() != secret.read_bytes()
    html = (out / "report.html").read_text()
    import base64

    assert base64.b64encode(secret.read_bytes()).decode()[:40] not in html


def test_a_shard_path_that_leaves_the_folder_is_not_trusted(digits_model, tmp_path, capsys, caplog):
    out = tmp_path / "o"
    ok(capsys, distill_args(digits_model, out))
    (out / "manifest.json").unlink()
    (out / ".partial").mkdir()
    rec = {"path": "../../etc/passwd", "class_id": "0"}
    torch.save({"indices": [0], "latents": None, "records": [rec], "grid": {}},
               out / ".partial" / "00000-000000-000001.pt")
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, distill_args(digits_model, out))
    m = json.loads((out / "manifest.json").read_text())
    assert [r["path"] for r in m["images"]] == ["images/000-0/0.png"]


# --------------------------------------------------------------------------- 3. --overwrite


def test_overwrite_refuses_a_folder_mgd3_did_not_write(digits_model, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "images" / "holiday").mkdir(parents=True)
    (out / "images" / "holiday" / "beach.png").write_bytes(b"my photo")
    (out / "manifest.json").write_text('{"my": "own manifest"}')
    refused(capsys, distill_args(digits_model, out, "--overwrite"), "deletes only what it wrote")
    assert (out / "images" / "holiday" / "beach.png").read_bytes() == b"my photo"
    assert json.loads((out / "manifest.json").read_text()) == {"my": "own manifest"}


def test_overwrite_replaces_an_mgd3_set(base_set, digits_model, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(base_set, out)
    (out / ".mgd3-run.json").unlink()  # a finished set: its manifest says what wrote it
    ok(capsys, distill_args(digits_model, out, "--overwrite"))
    assert len(json.loads((out / "manifest.json").read_text())["images"]) == 1


def test_pretrain_overwrite_refuses_a_model_it_did_not_write(digits_model, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(digits_model, out)
    refused(capsys, ["pretrain", *TINY_PRETRAIN, "--out", out, "--overwrite"], "deletes only what it wrote")
    assert (out / "transformer").is_dir() and (out / "model_index.json").is_file()


# --------------------------------------------------------------------------- 4. one validation


@pytest.mark.parametrize("yaml_text, msg", [
    ('ipc: "ten"', "ipc must be an integer, got 'ten'"),
    ("steps: [1, 2]", "steps must be an integer or null, got [1, 2]"),
    ("ipc: 1.7", "ipc must be an integer, got 1.7"),
    ("ipc: true", "ipc must be an integer, got True"),
    ("lambda: fast", "lambda must be a number"),
    ("no_such_key: 1", "unknown option 'no_such_key'"),
    ("cfg: .nan", "--cfg must be a finite number >= 0, got nan"),
    ("modes: nope", "unknown mode finder 'nope'"),
    ("mode-seed: -1", "--mode-seed must be at least 0, got -1"),
])
def test_distill_yaml_types_are_checked_before_anything_is_written(digits_model, tmp_path, capsys, yaml_text,
                                                                    msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "\n")
    out = tmp_path / "o"
    refused(capsys, ["distill", "--data", "digits", "--classes", "0", "--model", digits_model, "--out", out,
                     "--quiet", "--device", "cpu", "--config", cfg], msg, out)
    assert not out.exists()  # no run file, no images/


@pytest.mark.parametrize("sub", ["distill", "evaluate", "report", "pretrain"])
@pytest.mark.parametrize("kind, msg", [("binary", "is not a text (UTF-8) file"), ("folder", "is a folder"),
                                       ("list", "must hold a mapping"), ("type", "must be")])
def test_every_subcommand_reads_yaml_the_same_way(sub, kind, msg, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    if kind == "binary":
        cfg.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    elif kind == "folder":
        cfg.mkdir()
    elif kind == "list":
        cfg.write_text("- 1\n- 2\n")
    else:
        key = {"distill": "batch_size", "evaluate": "epochs", "report": "neighbors", "pretrain": "epochs"}[sub]
        cfg.write_text(f"{key}: [3]\n")
    base = {"distill": ["distill", "--data", "digits", "--out", tmp_path / "o"],
            "evaluate": ["evaluate", tmp_path], "report": ["report", tmp_path, "--out", tmp_path / "r"],
            "pretrain": ["pretrain", "--data", "digits", "--out", tmp_path / "m"]}[sub]
    refused(capsys, [*base, "--config", cfg], msg)


@pytest.mark.parametrize("argv, msg", [
    (["--kl-weight", "nan"], "--kl-weight must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--cfg", "nan"], "--cfg must be a finite number >= 0, got nan"),
    (["--vae-lr", "-1"], "--vae-lr must be greater than 0"),
    (["--seed", "-3"], "--seed must be at least 0"),
])
def test_pretrain_refuses_meaningless_numbers_before_writing(tmp_path, capsys, argv, msg):
    refused(capsys, ["pretrain", "--data", "digits", "--out", tmp_path / "m", *argv], msg)
    assert not (tmp_path / "m").exists()


def _model_with(digits_model, tmp_path, edit) -> Path:
    m = tmp_path / "model"
    shutil.copytree(digits_model, m)
    edit(m)
    return m


@pytest.mark.parametrize("text, msg", [
    ('{"defaults": {"cfg": NaN}}', "cfg must be a finite number >= 0, got nan"),
    ('{"defaults": {"cfg": -5}}', "cfg must be a finite number >= 0, got -5"),
    ('{"defaults": {"cfg": "high"}}', "cfg must be a number"),
    ('{"defaults": {"methods": {"mgd3": {"lambda": NaN}}}}', "--lambda must be a finite number >= 0, got nan"),
    ('{"defaults": [1, 2]}', '"defaults" must be a mapping'),
    ("[1, 2]", "must hold a JSON object"),
    ("{not json", "is not valid JSON"),
])
def test_model_recommendations_are_validated_like_flags(digits_model, tmp_path, capsys, text, msg):
    model = _model_with(digits_model, tmp_path, lambda m: (m / "mgd3.json").write_text(text))
    out = tmp_path / "o"
    refused(capsys, distill_args(model, out, "--method", "mgd3"), msg, out)
    assert not out.exists()


def test_help_lists_the_choices_of_enumerated_options(capsys):
    assert main(["distill", "--help"]) == 0
    text = capsys.readouterr().out
    for choices in ("{bisecting,dbscan,divisive,gmm,kmeans,kmeans-closest,kmeans-minibatch,random,spectral}",
                    "{auto,ddpm,ddim,x0}",
                    "{fp32,bf16,fp16}", "{minibatch,full}"):
        assert choices in text, choices


# --------------------------------------------------------------------------- 5. no silent garbage


def test_non_finite_latents_stop_the_run_before_a_set_is_written(digits_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    def poison(m):
        f = m / "transformer" / "diffusion_pytorch_model.safetensors"
        w = load_file(f)
        k = next(k for k in w if k.startswith("proj_out_2") and k.endswith("weight"))
        w[k] = torch.full_like(w[k], float("nan"))
        save_file(w, f)

    model = _model_with(digits_model, tmp_path, poison)
    out = tmp_path / "o"
    refused(capsys, distill_args(model, out), "hold NaN or inf", out)
    assert not list((out / "images").rglob("*.png"))


# --------------------------------------------------------------------------- 6. one line for each case


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(digits_model, tmp_path, capsys):
    refused(capsys, distill_args(digits_model, tmp_path / "o", "--device", "cuda"), "CUDA is not available")
    refused(capsys, ["evaluate", tmp_path, "--device", "cuda:1"], "CUDA is not available")
    refused(capsys, ["pretrain", "--data", "digits", "--out", tmp_path / "m", "--device", "cuda"],
            "CUDA is not available")
    refused(capsys, ["report", tmp_path, "--device", "cuda"], "CUDA is not available")


@pytest.mark.parametrize("name", ["index-list", "id2label-key", "index-garbage", "huge-config", "betas"])
def test_broken_model_folders(digits_model, tmp_path, capsys, name):
    def edit(m):
        idx = m / "model_index.json"
        if name == "index-list":
            idx.write_text("[1, 2, 3]")
        elif name == "id2label-key":
            d = json.loads(idx.read_text())
            d["id2label"] = {"zero": "0"}
            idx.write_text(json.dumps(d))
        elif name == "index-garbage":
            idx.write_bytes(os.urandom(64))
        elif name == "huge-config":
            f = m / "transformer" / "config.json"
            d = json.loads(f.read_text())
            d.update(num_layers=100, attention_head_dim=4096, num_attention_heads=16)
            f.write_text(json.dumps(d))
        elif name == "betas":
            f = m / "scheduler" / "scheduler_config.json"
            d = json.loads(f.read_text())
            d["beta_end"] = "lots"
            f.write_text(json.dumps(d))

    msg = {"index-list": "must hold a JSON object", "id2label-key": "is not an integer label",
           "index-garbage": "model_index.json", "huge-config": "parameters", "betas": "must be numbers"}[name]
    out = tmp_path / "o"
    refused(capsys, distill_args(_model_with(digits_model, tmp_path, edit), out), msg, out)
    assert not out.exists()


def test_sd_folder_with_a_broken_tokenizer(tmp_path, capsys):
    from mgd3.testing import build_sd_folder

    model = build_sd_folder(tmp_path / "sd")
    (model / "tokenizer" / "vocab.json").write_text("{broken")
    refused(capsys, ["distill", "--data", "digits", "--classes", "0", "--ipc", "1", "--model", model,
                     "--out", tmp_path / "o", *TINY_DISTILL], "tokenizer/vocab.json is not valid JSON")


def test_save_resolution_is_checked_against_memory(digits_model, tmp_path, capsys):
    refused(capsys, distill_args(digits_model, tmp_path / "o", "--save-resolution", "60000"), "--save-resolution")
    refused(capsys, distill_args(digits_model, tmp_path / "o", "--save-resolution", "9000", "--batch-size", "32"),
            "memory")


def test_cache_dir_that_is_a_file(digits_model, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    refused(capsys, distill_args(digits_model, tmp_path / "o", "--cache-dir", f), "is a file, not a folder")
    refused(capsys, ["evaluate", tmp_path, "--cache-dir", f / "sub"], "is a file, not a folder")


def test_mode_seed_negative(digits_model, tmp_path, capsys):
    refused(capsys, distill_args(digits_model, tmp_path / "o", "--method", "mgd3", "--mode-seed", "-1"),
            "--mode-seed must be at least 0, got -1")


def test_class_map_label_outside_the_model(digits_model, tmp_path, capsys):
    cm = tmp_path / "map.txt"
    cm.write_text("0 999\n")
    out = tmp_path / "o"
    refused(capsys, distill_args(digits_model, out, "--class-map", cm), "label 999, outside the model's 0..9", out)
    assert not out.exists()  # refused before the run file and images/


@pytest.mark.parametrize("argv, msg", [
    (["--seeds", "1e23"], "invalid int value"),
    (["--seeds", str(10**23)], "--seeds must be at most"),
    (["--option", "lr=abc"], "lr must be a number, got 'abc'"),
    (["--option", "lr=nan"], "--option lr must be a finite number"),
    (["--option", "nope=1"], "unknown protocol option 'nope'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--resolution", "0"], "--resolution must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_evaluate_option_values(a_set, capsys, argv, msg):
    refused(capsys, ["evaluate", a_set, "--device", "cpu", "--quiet", *argv], msg)
    assert not (a_set / "eval.json").exists()


@pytest.mark.parametrize("edit, msg", [
    (lambda m: m.update(ipc="3"), "ipc must be an integer, got '3'"),
    (lambda m: m.update(ipc=999), "contradicts its files: ipc 999"),
    (lambda m: m.update(images=m["images"][:1]), "contradicts its files"),
    (lambda m: m.update(classes="all"), '"classes" must be a non-empty list'),
    (lambda m: m["images"][0].update(class_id="nine"), "an image of class 'nine'"),
    (lambda m: m["images"][0].update(path=7), "must be a non-empty string"),
    (lambda m: m["data"].update(channels="grey"), "data.channels"),
])
def test_manifest_that_contradicts_its_files(a_set, tmp_path, capsys, edit, msg):
    edit_manifest(a_set, edit)
    refused(capsys, ["evaluate", a_set, "--epochs", "1", "--seeds", "0", "--device", "cpu", "--quiet"], msg)


def test_manifest_that_is_a_list(a_set, capsys, tmp_path):
    (a_set / "manifest.json").write_text("[1, 2]")
    refused(capsys, ["evaluate", a_set, "--epochs", "1", "--device", "cpu", "--quiet"], "must hold a JSON object")
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet"], "must hold a JSON object")


def test_set_image_over_the_pixel_cap(a_set, capsys):
    first = a_set / json.loads((a_set / "manifest.json").read_text())["images"][0]["path"]
    Image.new("L", (9000, 9000)).save(first)  # ~80 KB on disk, 81 M pixels
    refused(capsys, ["evaluate", a_set, "--epochs", "1", "--device", "cpu", "--quiet"], "more than mgd3 reads")


def test_eval_json_with_a_string_mean(a_set, tmp_path, capsys):
    (a_set / "eval.json").write_text(json.dumps({"format": "mgd3-eval/1", "mean": "high", "protocol": {}}))
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet"], "mean must be a finite number")


def test_report_option_values(a_set, tmp_path, capsys):
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--neighbors", "0"], "--neighbors must be at least 1")
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--embedding", "umap"], "invalid choice")


def test_a_malformed_run_file_or_shard_is_not_trusted(digits_model, tmp_path, capsys, caplog):
    out = tmp_path / "o"
    ok(capsys, distill_args(digits_model, out))
    (out / "manifest.json").unlink()
    (out / ".partial").mkdir()
    torch.save({"indices": 5, "latents": "x", "records": {}, "grid": []}, out / ".partial" / "00000-000000-000001.pt")
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, distill_args(digits_model, out))  # the bad shard is dropped, its batch made again
    assert (out / "manifest.json").is_file()
    (out / "manifest.json").unlink()
    run = json.loads((out / ".mgd3-run.json").read_text())
    (out / ".mgd3-run.json").write_text(json.dumps({**run, "key": [1, 2]}))
    refused(capsys, distill_args(digits_model, out), "holds no unfinished mgd3 run", out)


def test_evaluate_out_that_is_not_a_regular_file(a_set, capsys):
    refused(capsys, ["evaluate", a_set, "--out", a_set / "images", "--device", "cpu"], "is a folder")


def test_python_api_configs_get_the_same_type_checks(tmp_path):
    from mgd3.run.driver import DistillConfig, distill
    from mgd3.errors import Mgd3Error
    from mgd3.evaluation.core import EvalConfig, evaluate

    with pytest.raises(Mgd3Error, match="DistillConfig: ipc must be an integer, got 'ten'"):
        distill(DistillConfig(data="digits", out=str(tmp_path / "o"), ipc="ten"))
    with pytest.raises(Mgd3Error, match="EvalConfig: seeds must be a list of integers"):
        evaluate(EvalConfig(set_dir=str(tmp_path), seeds=[0.5]))
    assert not (tmp_path / "o").exists()
