"""Issue 32, hostile input round 2: a manifest cannot point outside its set.

What a manifest or an `evals/` entry names (data folder, data root, class map, model, evaluation
files) is read only when it lies inside the set, or when the user names it; `report` checks the
model fingerprint the manifest recorded before recomputing anything with a model, and a set's
contents never start a download. An `--out` inside the data folder is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clitools import ok, refused
from conftest import TINY_DISTILL, edit_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def report(a_set, tmp_path):
    return ["report", a_set, "--out", tmp_path / "r", "--quiet", "--device", "cpu", "--embedding", "pca",
            "--no-evaluate"]


def test_the_manifest_records_the_model_fingerprint(a_set, digits_model):
    from mgd3.files import folder_fingerprint as model_fingerprint

    m = json.loads((a_set / "manifest.json").read_text())
    assert m["model"]["fingerprint"] == model_fingerprint(Path(digits_model))


def test_report_refuses_a_model_that_is_not_the_one_that_made_the_set(a_set, digits_model, tmp_path, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(digits_model, other)
    edit_manifest(a_set, lambda m: m["model"].update(path=str(other)))
    f = other / "transformer" / "config.json"
    f.write_text(f.read_text().replace("}", ', "_note": "swapped"}', 1))
    refused(capsys, report(a_set, tmp_path), "is not the one that made")
    assert not (tmp_path / "r" / "report.md").exists()


@pytest.mark.parametrize("model", ["some-org/some-repo", "../no/such/model"])
def test_report_never_downloads_what_a_set_names(a_set, tmp_path, capsys, monkeypatch, model):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the refusal must not depend on it

    def no_download(*a, **k):
        raise AssertionError("a download was started")

    monkeypatch.setattr("mgd3.backends.hub.download", no_download)
    edit_manifest(a_set, lambda m: m["model"].update(path=model))
    refused(capsys, report(a_set, tmp_path), "report never downloads what a set names")


def test_report_does_not_read_a_class_map_outside_the_set(a_set, tmp_path, capsys, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n")
    edit_manifest(a_set, lambda m: m["config"].update(class_map=str(secret)))
    ok(capsys, report(a_set, tmp_path))
    assert "TOP-SECRET-LINE" not in capsys.readouterr().err
    assert "TOP-SECRET-LINE" not in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("sub", ["evaluate", "report"])
@pytest.mark.parametrize("edit, msg", [
    (lambda m: m["data"].update(name="/etc"), "names the data folder '/etc', outside the set"),
    (lambda m: m["data"].update(name="imagenette", data_root="/etc"), "names the data root '/etc', outside the set"),
])
def test_data_named_by_the_manifest_must_be_inside_or_named_by_the_user(a_set, tmp_path, capsys, sub, edit, msg):
    edit_manifest(a_set, edit)
    argv = (["evaluate", a_set, "--epochs", "1", "--seeds", "0", "--device", "cpu", "--quiet"] if sub == "evaluate"
            else report(a_set, tmp_path))
    line = refused(capsys, argv, msg)
    assert "pass --data" in line


def test_an_evals_symlink_out_of_the_set_is_not_read(a_set, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.json").write_text(json.dumps({"format": "mgd3-eval/1", "mean": 99.99, "protocol": {}}))
    (a_set / "evals").symlink_to(outside)
    refused(capsys, report(a_set, tmp_path), "leads out of the set folder")
    assert not (tmp_path / "r" / "report.md").exists()
    (a_set / "evals").unlink()
    (a_set / "evals").mkdir()
    (a_set / "evals" / "x.json").symlink_to(outside / "x.json")
    refused(capsys, report(a_set, tmp_path), "leads out of the set folder")


def test_out_inside_the_data_folder_is_refused(digits_model, tmp_path, capsys):
    from test_hostile_images import image_folder

    imgs = image_folder(tmp_path / "imgs")
    refused(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", imgs / "set", "--ipc", "1", *TINY_DISTILL],
            "lies inside the data folder")
    assert not (imgs / "set").exists()
