"""Issue 32, hostile input round 2: image files and image folders, through the real CLI in-process.

- Damaged pixel data that a header check passes (a PNG whose zlib stream is broken under valid
  chunk CRCs, a truncated JPEG) is found by the check that skips unusable files, as `--help`
  promises: skipped with one warning, or one error line with `--strict`.
- An image whose header claims more pixels than the budget, or that the shorter-side resize
  would blow up (40 000 000 x 1), is refused before decoding; PIL's DecompressionBombWarning
  becomes the same one line.
- Symlink loops, links to `/` and unreadable folders in a data folder: one line (class level) or
  one warning and the run goes on (inside a class folder), for distill and pretrain.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import ok, refused

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--ipc", "1", "--quiet", "--device", "cpu", "--method", "plain"]
TINY_PRETRAIN = ["--limit", "64", "--vae-epochs", "1", "--epochs", "1", "--size", "tiny", "--max-steps", "1",
                 "--batch-size", "32", "--vae-width", "8", "--vae-levels", "2", "--quiet", "--device", "cpu",
                 "--resolution", "8", "--channels", "1"]


def image_folder(root: Path, n: int = 3, classes=("0", "1")) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    for cid in classes:
        (root / cid).mkdir(parents=True)
        for k, img in enumerate(d.images[d.target == int(cid)][:n]):
            Image.fromarray((img * 255.0 / 16.0).round().astype(np.uint8), mode="L").save(root / cid / f"{k}.png")
    return root


def broken_zlib_png(f: Path) -> None:
    """A PNG whose IDAT chunk holds a damaged zlib stream under a correct CRC: `verify()` passes it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    i = raw.index(b"IDAT")
    n = struct.unpack(">I", raw[i - 4:i])[0]
    data = bytearray(raw[i + 4:i + 4 + n])
    data[2:n - 4] = bytes([0xFF]) * (n - 6)  # keep the zlib header, damage the deflate blocks
    raw[i + 4:i + 4 + n] = data
    raw[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)) & 0xFFFFFFFF)
    f.write_bytes(bytes(raw))
    with Image.open(f) as im:
        im.verify()  # the header check passes it
    with pytest.raises(Exception), Image.open(f) as im:
        im.load()


def truncated_jpeg(f: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    f.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(f) as im:
        im.verify()  # passes: JPEG's verify reads nothing
    with pytest.raises(OSError), Image.open(f) as im:
        im.load()


# --------------------------------------------------------------------------- damaged pixel data


def test_damaged_pixels_are_skipped_with_a_warning_or_stop_with_strict(digits_model, tmp_path, capsys, caplog):
    imgs = image_folder(tmp_path / "imgs")
    broken_zlib_png(imgs / "0" / "8.png")
    truncated_jpeg(imgs / "1" / "9.jpg")
    out = tmp_path / "o"
    line = refused(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", out, *FAST, "--strict"],
                   "is unusable", out)
    assert "8.png" in line and "2 such file(s)" in line
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", out, *FAST])
    warn = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warn) == 1 and "2 missing or unreadable image file(s)" in warn[0]
    assert (out / "manifest.json").is_file()


def test_damaged_pixels_read_lazily_are_one_line(digits_model, tmp_path, capsys):
    """pretrain reads files when it uses them: a damaged one is one line naming it."""
    imgs = image_folder(tmp_path / "imgs")
    broken_zlib_png(imgs / "0" / "0.png")
    line = refused(capsys, ["pretrain", "--data", imgs, "--out", tmp_path / "m", *TINY_PRETRAIN], "cannot read image")
    assert "0.png" in line
    assert not (tmp_path / "m" / "model_index.json").exists()


# --------------------------------------------------------------------------- pixel budget


def test_a_thin_giant_image_is_refused_before_decoding(digits_model, tmp_path, capsys, caplog):
    imgs = image_folder(tmp_path / "imgs")
    Image.new("L", (4_000_000, 1)).save(imgs / "1" / "thin.png")  # ~4 KB; resized to 8 high: 32 M x 8 floats
    assert (imgs / "1" / "thin.png").stat().st_size < 100_000
    out = tmp_path / "o"
    line = refused(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", out, *FAST, "--strict"],
                   "thin.png", out)
    assert "4000000x1 pixels" in line
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", out, *FAST])
    assert any("thin.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)

    line = refused(capsys, ["pretrain", "--data", imgs, "--out", tmp_path / "m", *TINY_PRETRAIN], "thin.png")
    assert "more than mgd3 allocates" in line


def test_pil_decompression_bomb_warning_is_one_line(tmp_path, capsys):
    from mgd3.errors import Mgd3Error
    from mgd3.images import read_image

    f = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(f)  # 90 M pixels: above PIL's warning limit
    with pytest.raises(Mgd3Error) as e:
        read_image(f, 1, 8)
    assert "9500x9500 pixels, more than mgd3 reads" in str(e.value) and "\n" not in str(e.value)


def test_set_image_that_is_a_fifo_does_not_hang(digits_model, tmp_path, capsys):
    out = tmp_path / "set"
    ok(capsys, ["distill", "--data", "digits", "--classes", "0", "--model", digits_model, "--out", out, *FAST])
    first = out / json.loads((out / "manifest.json").read_text())["images"][0]["path"]
    first.unlink()
    os.mkfifo(first)
    line = refused(capsys, ["evaluate", out, "--epochs", "1", "--device", "cpu", "--quiet"])
    assert "0.png" in line  # "missing" (not a regular file) or "is a FIFO": never a blocked open


# --------------------------------------------------------------------------- folders


@pytest.mark.parametrize("sub", ["distill", "pretrain"])
@pytest.mark.parametrize("kind, msg", [
    ("class-loop", "cannot be followed (a loop)"),
    ("class-root", "does not follow: it points to /"),
    ("class-unreadable", "cannot list class folder"),
    ("data-unreadable", "cannot list data folder"),
    ("sub-unreadable", "cannot list folder"),
])
def test_folder_faults_are_one_line(digits_model, tmp_path, capsys, monkeypatch, sub, kind, msg):
    imgs = image_folder(tmp_path / "imgs")
    if kind == "class-loop":
        (imgs / "2").symlink_to(imgs / "2")
    elif kind == "class-root":
        (imgs / "2").symlink_to("/")
    else:  # as root chmod does not stop a read: the error is injected where os.scandir meets the folder
        target = {"class-unreadable": imgs / "1", "data-unreadable": imgs, "sub-unreadable": imgs / "1" / "deep"}[kind]
        target.mkdir(exist_ok=True)
        real = os.scandir

        def scandir(p="."):
            if Path(p) == target:
                raise PermissionError(13, "Permission denied", str(p))
            return real(p)

        monkeypatch.setattr("mgd3.io.folders.os.scandir", scandir)
    argv = (["distill", "--data", imgs, "--model", digits_model, "--out", tmp_path / "o", *FAST] if sub == "distill"
            else ["pretrain", "--data", imgs, "--out", tmp_path / "o", *TINY_PRETRAIN])
    refused(capsys, argv, msg, tmp_path / "o")
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_links_inside_a_class_folder_that_loop_or_lead_up_are_skipped(digits_model, tmp_path, capsys, caplog):
    imgs = image_folder(tmp_path / "imgs")
    (imgs / "0" / "root").symlink_to("/")
    (imgs / "0" / "up").symlink_to(imgs)
    (imgs / "1" / "loop").symlink_to(imgs / "1" / "loop")
    (imgs / "1" / "proc").symlink_to("/proc/self")
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", out, *FAST])
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "not following" in said and "a loop" in said and "pseudo file system" in said
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["images"]) == 2
