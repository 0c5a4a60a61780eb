"""Issue 32, hostile input round 2: filesystem faults through the real CLI.

Real faults where the machine allows them: a 256 KiB tmpfs (full disk) and a read-only tmpfs in a
private mount namespace (`unshare -m`, root only), the file size limit (`RLIMIT_FSIZE`, as
`ulimit -f`), /proc as an output. Injected `OSError`s elsewhere (torch's archive writer, a PNG
write). Every failure is one `mgd3: error:` line naming the file and what to do, and leaves no
manifest; a failed cache write warns once and the run goes on. `--overwrite` removes only what
mgd3 wrote and never follows a symlink; `--cache-dir` and matplotlib's cache stay where they are put.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clitools import ok, refused
from conftest import ROOT, TINY_DISTILL

pytestmark = pytest.mark.usefixtures("one_thread")


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


NAMESPACES = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m (a private tmpfs)")


def mgd3_in_namespace(setup: str, argv: list, tmp_path: Path, preexec=None) -> subprocess.CompletedProcess:
    """`mgd3 argv` in a private mount namespace after the shell lines `setup` (MNT = a fresh folder)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "mgd3", *map(str, argv)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MNT": str(mnt)}
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{setup} && exec {cmd}"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, preexec_fn=preexec)


def one_line(r: subprocess.CompletedProcess, *wanted: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("mgd3: error: "), r.stderr
    for w in wanted:
        assert w in errors[0], errors[0]
    return errors[0]


def distill(model, out, *more):
    return ["distill", "--data", "digits", "--classes", "0", "1", "--ipc", "2", "--model", model, "--out", out,
            *TINY_DISTILL, *more]


# --------------------------------------------------------------------------- real faults


@NAMESPACES
def test_full_output_disk(digits_model, tmp_path):
    """A 24 KiB tmpfs: the run file and the folders fit, the images do not."""
    r = mgd3_in_namespace('mount -t tmpfs -o size=24k tmpfs "$MNT"',
                          distill(digits_model, str(tmp_path / "mnt" / "set"), "--ipc", "40"), tmp_path)
    one_line(r, "the disk is full")


@NAMESPACES
def test_read_only_output_and_evaluate_out(digits_model, tmp_path, capsys):
    ro = 'mount -t tmpfs -o size=1m tmpfs "$MNT" && mount -o remount,ro "$MNT"'
    one_line(mgd3_in_namespace(ro, distill(digits_model, tmp_path / "mnt" / "set"), tmp_path), "set")
    s = tmp_path / "s"
    ok(capsys, distill(digits_model, s))
    r = mgd3_in_namespace(ro, ["evaluate", s, "--epochs", "1", "--seeds", "0", "--device", "cpu", "--quiet",
                               "--out", tmp_path / "mnt" / "e.json", "--threads", "1"], tmp_path)
    one_line(r, "e.json", "read-only")


@NAMESPACES
def test_read_only_cache_warns_once_and_the_run_goes_on(digits_model, tmp_path):
    ro = 'mount -t tmpfs -o size=1m tmpfs "$MNT" && mount -o remount,ro "$MNT"'
    out = tmp_path / "set"
    r = mgd3_in_namespace(ro, [*distill(digits_model, out, "--cache-dir", tmp_path / "mnt"), "--method",
                               "kmeans-real"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("going on without caching") == 1, r.stderr
    assert (out / "manifest.json").is_file()


def test_file_size_limit(digits_model, tmp_path):
    """ulimit -f: the images fit, latents.pt (or a shard) does not: EFBIG, one line."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    out = tmp_path / "set"
    r = subprocess.run([sys.executable, "-m", "mgd3", *map(str, distill(digits_model, out, "--ipc", "8"))],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=limit,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    one_line(r, "file size limit (ulimit -f)")
    assert not (out / "manifest.json").exists()


def test_evaluate_out_in_proc(digits_model, tmp_path, capsys):
    s = tmp_path / "s"
    ok(capsys, distill(digits_model, s))
    refused(capsys, ["evaluate", s, "--epochs", "1", "--seeds", "0", "--device", "cpu", "--quiet", "--out",
                     "/proc/mgd3-eval.json"], "pseudo file system")


# --------------------------------------------------------------------------- injected faults


@pytest.mark.parametrize("code, msg", [(errno.ENOSPC, "the disk is full"), (errno.EFBIG, "ulimit -f"),
                                       (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_image_write_faults_are_one_line(digits_model, tmp_path, capsys, monkeypatch, code, msg):
    from PIL import Image

    def save(self, fp, *a, **k):
        raise OSError(code, os.strerror(code), str(fp))

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "set"
    line = refused(capsys, distill(digits_model, out), msg, out)
    assert ".png" in line


def test_torch_writer_failure_of_a_cache_warns_once(digits_model, tmp_path, capsys, monkeypatch, caplog):
    """torch.save says a full disk as RuntimeError('... file write failed'): a cache write goes on."""
    import mgd3.files

    real = torch.save

    def save(obj, f, *a, **k):
        if str(tmp_path / "c") in str(getattr(f, "name", f)):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(mgd3.files, "_CACHE_WARNED", set())
    out = tmp_path / "set"
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, [*distill(digits_model, out, "--cache-dir", tmp_path / "c"), "--method", "kmeans-real"])
    warned = [r for r in caplog.records if "going on without caching" in r.getMessage()]
    assert len(warned) == 1
    assert (out / "manifest.json").is_file()


def test_a_set_write_failure_never_exits_0(digits_model, tmp_path, capsys, monkeypatch):
    import mgd3.io.store

    monkeypatch.setattr(mgd3.io.store, "write_text_atomic", lambda p, t: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", str(p))))
    out = tmp_path / "set"
    refused(capsys, distill(digits_model, out), "the disk is full", out)


# --------------------------------------------------------------------------- --overwrite


@pytest.fixture
def a_set(digits_model, tmp_path, capsys):
    out = tmp_path / "set"
    ok(capsys, distill(digits_model, out))
    return out


def test_overwrite_keeps_a_users_file_inside_images(a_set, digits_model, capsys, caplog):
    (a_set / "images" / "NOTES.txt").write_text("mine")
    cls = next(d for d in (a_set / "images").iterdir() if d.is_dir())
    (cls / "README").write_text("mine too")
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        ok(capsys, distill(digits_model, a_set, "--overwrite", "--seed", "1"))
    assert (a_set / "images" / "NOTES.txt").read_text() == "mine"
    assert (cls / "README").read_text() == "mine too"
    assert any("did not write" in r.getMessage() for r in caplog.records)
    m = json.loads((a_set / "manifest.json").read_text())
    assert m["seed"] == 1 and all((a_set / im["path"]).is_file() for im in m["images"])


@pytest.mark.parametrize("name", ["images", ".partial"])
def test_overwrite_never_follows_a_symlink(a_set, digits_model, tmp_path, capsys, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0.png").write_text("a user's file behind the link")
    if (a_set / name).exists():
        shutil.rmtree(a_set / name)
    (a_set / name).symlink_to(elsewhere)
    ok(capsys, distill(digits_model, a_set, "--overwrite", "--seed", "1"))
    assert (elsewhere / "0.png").read_text() == "a user's file behind the link"
    assert not (a_set / name).is_symlink()
    # resuming an unfinished run that would write through such a link is refused
    (a_set / "manifest.json").unlink()
    shutil.rmtree(a_set / name, ignore_errors=True)
    (a_set / name).symlink_to(elsewhere)
    refused(capsys, distill(digits_model, a_set, "--seed", "1"), "is a symbolic link", a_set)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["0.png"]


# --------------------------------------------------------------------------- where caches go


def test_cache_dir_is_honoured_by_the_image_check(digits_model, tmp_path, capsys, monkeypatch):
    from test_hostile_images import image_folder

    imgs = image_folder(tmp_path / "imgs")
    default = tmp_path / "default-cache"
    monkeypatch.setenv("MGD3_CACHE_DIR", str(default))
    ok(capsys, ["distill", "--data", imgs, "--model", digits_model, "--out", tmp_path / "o", "--ipc", "1", *TINY_DISTILL,
                "--cache-dir", tmp_path / "mine"])
    assert list((tmp_path / "mine" / "checked").glob("*.json"))
    assert not default.exists()


def test_report_keeps_matplotlib_out_of_home(a_set, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", MGD3_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "mgd3", "report", str(a_set), "--out", str(tmp_path / "r"), "--quiet",
                        "--device", "cpu", "--no-evaluate"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert not any(home.rglob("*")), list(home.rglob("*"))
    assert (tmp_path / "cache" / "matplotlib").is_dir()
