"""Issue 32, hostile input round 2: fingerprints that cannot collide by accident, and model label
names that cannot be remapped silently.

Two image folders with the same file names, sizes and mtimes (what a tar extraction gives) but
other pixels must not share cached encodings; a class name that names two labels of a model
(ImageNet names two classes "crane") is refused, not mapped to one of them.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from clitools import ok, refused
from conftest import TINY_STEPS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_names_sizes_and_mtimes_but_other_pixels_do_not_share_encodings(digits_model, tmp_path, capsys):
    from mgd3.io.data import load_data
    from test_hostile_images import image_folder

    a = image_folder(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)  # copy2: names, sizes and mtimes as in a
    for f in sorted(b.rglob("*.png")):
        st = f.stat()
        with Image.open(f) as im:
            arr = 255 - np.asarray(im)  # other pixels
        Image.fromarray(arr).save(f)
        raw = f.read_bytes()
        f.write_bytes(raw[: st.st_size].ljust(st.st_size, b"\0"))  # the same size (tail padded or cut)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime, as tar restores it
        assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert load_data(str(a), resolution=8).fingerprint() != load_data(str(b), resolution=8).fingerprint()
    cache = tmp_path / "cache"
    for folder in (a, b):  # through the CLI: the second run encodes its own images
        ok(capsys, ["distill", "--data", folder, "--model", digits_model, "--out", tmp_path / f"o-{folder.name}",
                    "--ipc", "1", "--method", "kmeans-real", "--cache-dir", cache, *TINY_STEPS])
    assert len(list((cache / "latents").iterdir())) == 2


def test_a_name_that_names_two_labels_is_refused(digits_model, tmp_path, capsys):
    from test_hostile_images import image_folder

    m = tmp_path / "model"
    shutil.copytree(digits_model, m)
    idx = json.loads((m / "model_index.json").read_text())
    idx["id2label"]["9"] = "crane"
    idx["id2label"]["0"] = "crane"
    (m / "model_index.json").write_text(json.dumps(idx))
    imgs = image_folder(tmp_path / "imgs", classes=("1", "2"))
    (imgs / "2").rename(imgs / "crane")
    out = tmp_path / "o"
    line = refused(capsys, ["distill", "--data", imgs, "--model", m, "--out", out, "--ipc", "1", "--method", "plain",
                            *TINY_STEPS], "names 2 labels", out)
    assert "0, 9" in line and "--class-map" in line
    (tmp_path / "map.txt").write_text("crane 9\n")
    ok(capsys, ["distill", "--data", imgs, "--model", m, "--out", out, "--ipc", "1", "--method", "plain",
                "--class-map", tmp_path / "map.txt", *TINY_STEPS])
    labels = {c["class_id"]: c["label"] for c in json.loads((out / "manifest.json").read_text())["classes"]}
    assert labels == {"1": 1, "crane": 9}
