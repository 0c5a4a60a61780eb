"""Bad input to `mgd3 distill`, through the real CLI called in-process (`mgd3.cli.main`): exit
status 2, one `mgd3: error:` line, no traceback, no manifest.json. Also the image-folder policy
for missing or corrupt files (skipped with a warning by default, an error with --strict).
"""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import refused
from mgd3.cli import main

FAST = ["--steps", "4", "--ipc", "1", "--quiet", "--device", "cpu"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
pytestmark = pytest.mark.usefixtures("one_thread")


def _image_folder(root: Path, sizes: dict[str, int]) -> Path:
    """Class folders of 8×8 grayscale PNGs made from the scikit-learn digits of that class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for cid, n in sizes.items():
        (root / cid).mkdir(parents=True)
        imgs = d.images[d.target == int(cid)][:n]
        for k, img in enumerate(imgs):
            Image.fromarray((img * 255.0 / 16.0).round().astype(np.uint8), mode="L").save(root / cid / f"{k}.png")
    return root


def _broken_model(model: Path, dest: Path) -> Path:
    """A copy of `model` whose VAE config says 8 latent channels (the transformer takes 4)."""
    shutil.copytree(model, dest)
    f = dest / "vae" / "config.json"
    cfg = json.loads(f.read_text())
    cfg["latent_channels"] = 8
    f.write_text(json.dumps(cfg, indent=2))
    return dest


def _cases(ws: Path, model: Path) -> dict:
    """name -> (argv after `distill`, extra environment (None removes a variable), what stderr says)."""
    # class 0: 3 good images; class 1: 2 good + a corrupt file; class 2: 2 good + a missing one (broken link)
    imgs = _image_folder(ws / "imgs", {"0": 3, "1": 2, "2": 2})
    (imgs / "1" / "9.png").write_bytes(b"this is not a PNG file")
    (imgs / "2" / "9.png").symlink_to(imgs / "2" / "gone.png")
    empty = _image_folder(ws / "empty", {"0": 2, "1": 2})
    (empty / "2").mkdir()
    not_pipeline = ws / "not-a-pipeline"
    not_pipeline.mkdir()
    (not_pipeline / "README.md").write_text("just a folder\n")
    foreign = ws / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's file\n")
    a_file = ws / "a-file"
    a_file.write_text("x")
    hf_home = ws / "hf-home"
    hf_home.mkdir()

    digits = ["--data", "digits", "--classes", "0", "--model", model]
    folder = ["--data", imgs, "--model", model]
    cases = {
        "corrupt-file-strict": (folder + ["--strict"], {}, "is unusable"),
        "empty-class-folder": (["--data", empty, "--model", model], {}, "has no images"),
        "ipc-too-large-random-real": (folder + ["--method", "random-real", "--ipc", "3"], {},
                                      "IPC 3 is larger than class '1' (2 images)"),
        "ipc-too-large-kmeans-real": (folder + ["--method", "kmeans-real", "--ipc", "3"], {},
                                      "IPC 3 is larger than class '1' (2 images)"),
        "not-a-pipeline": (["--data", "digits", "--model", not_pipeline], {}, "is not a diffusers pipeline folder"),
        "latent-channel-mismatch": (["--data", "digits", "--model", _broken_model(model, ws / "mismatch")], {},
                                    "VAE latent channels (8) != transformer in_channels (4)"),
        "class-not-in-data": (folder + ["--classes", "0", "7"], {}, "unknown class '7'"),
        "unknown-method": (digits + ["--method", "nope"], {}, "unknown method 'nope'"),
        "unknown-option": (digits + ["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag"),
        "lambda-nan": (digits + ["--lambda", "nan"], {}, "--lambda must be a finite number >= 0, got nan"),
        "lambda-negative": (digits + ["--lambda", "-0.5"], {}, "--lambda must be a finite number >= 0, got -0.5"),
        "cfg-negative": (digits + ["--cfg", "-1"], {}, "--cfg must be a finite number >= 0, got -1"),
        "t-stop-past-last-step": (digits + ["--t-stop", "5"], {}, "--t-stop must be in -1..4 for 4 steps, got 5"),
        "foreign-output-folder": (digits, {}, "is not empty and holds no unfinished mgd3 run"),
        "output-is-a-file": (digits, {}, "exists and is not a folder"),
        "hf-offline-uncached-repo": (["--data", "digits", "--model", "some-org/some-repo"],
                                     {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None,
                                      "HUGGINGFACE_HUB_CACHE": None},
                                     "not in the Hugging Face cache (HF_HUB_OFFLINE is set"),
        # not errors: the default image-folder policy skips unusable files
        "corrupt-file-skipped": (folder, {}, None),
    }
    outs = {name: ws / "out" / name for name in cases}
    outs["foreign-output-folder"] = foreign
    outs["output-is-a-file"] = a_file
    if not AS_ROOT:  # root writes anywhere
        ro = ws / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        cases["unwritable-output-folder"] = (digits, {}, "cannot write to output folder")
        outs["unwritable-output-folder"] = ro / "set"
    return {name: (["distill", *FAST, *args, "--out", outs[name]], env, msg, outs[name])
            for name, (args, env, msg) in cases.items()}


@pytest.fixture(scope="module")
def cases(digits_model, tmp_path_factory):
    """name -> (argv, extra environment, expected message, out folder); the files made once."""
    ws = tmp_path_factory.mktemp("bad-input")
    yield _cases(ws, digits_model)
    ro = ws / "read-only"
    if ro.exists():
        ro.chmod(0o700)  # so pytest can clean up


def _run_case(cases, name, capsys, monkeypatch):
    argv, env, msg, out = cases[name]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, str(v))
    return argv, msg, out


ERROR_CASES = ["corrupt-file-strict", "empty-class-folder", "ipc-too-large-random-real", "ipc-too-large-kmeans-real",
               "not-a-pipeline", "latent-channel-mismatch", "class-not-in-data", "unknown-method",
               "unknown-option", "lambda-nan", "lambda-negative", "cfg-negative", "t-stop-past-last-step",
               "foreign-output-folder", "output-is-a-file", "hf-offline-uncached-repo"]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_is_one_error_line_and_exit_2(cases, name, capsys, monkeypatch):
    argv, msg, out = _run_case(cases, name, capsys, monkeypatch)
    line = refused(capsys, argv, msg, out)
    if name == "corrupt-file-strict":  # names the first unusable file and the count
        assert str(Path("1") / "9.png") in line and "2 such file(s)" in line
    if name == "foreign-output-folder":
        assert (out / "notes.txt").read_text() == "someone else's file\n"  # left alone
        assert not (out / "images").exists()


@pytest.mark.skipif(AS_ROOT, reason="root can write to a read-only folder")
def test_unwritable_output_folder(cases, capsys, monkeypatch):
    argv, msg, out = _run_case(cases, "unwritable-output-folder", capsys, monkeypatch)
    refused(capsys, argv, msg, out)


def test_missing_and_corrupt_files_are_skipped_by_default(cases, capsys, monkeypatch, caplog):
    argv, _, out = _run_case(cases, "corrupt-file-skipped", capsys, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "error:" not in err
    warn = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warn) == 1 and "2 missing or unreadable image file(s)" in warn[0] and "--strict" in warn[0]
    m = json.loads((out / "manifest.json").read_text())
    assert [rec["class_id"] for rec in m["images"]] == ["0", "1", "2"]
