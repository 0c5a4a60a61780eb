"""Issue 32, hostile input round 2: every text and byte format mgd3 reads goes through one bounded
reader (`mgd3.safeio`), so each listed cause is refused in one `mgd3: error:` line (exit 2),
through the real CLI in-process where the probe found it: integers over Python's 4300-digit
limit, nesting thousands deep, non-UTF-8 files, FIFOs, `/dev/zero`, a YAML alias bomb and a gzip
bomb as a Fashion-MNIST file. Every case runs under an alarm, so a hang fails instead of blocking.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest

from clitools import refused
from conftest import TINY_DISTILL, distill_args
from mgd3 import safeio
from mgd3.errors import Mgd3Error

HUGE = "9" * 5000  # over Python's 4300-digit int() limit
DEEP = 5000  # nesting that overflows a recursive parser
pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block runs over `seconds`."""
    def on_alarm(signum, frame):
        raise AssertionError(f"ran over {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _model_with(digits_model, tmp_path, edit) -> Path:
    m = tmp_path / "model"
    shutil.copytree(digits_model, m)
    edit(m)
    return m


def _edit_json(f: Path, fn) -> None:
    d = json.loads(f.read_text())
    f.write_text(fn(d))


# --------------------------------------------------------------------------- the reader itself


def test_alias_bomb_is_refused_fast():
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        levels.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]")
    bomb = "\n".join(levels)
    assert len(bomb) < 500
    t = time.perf_counter()
    with pytest.raises(Mgd3Error, match="expands through its aliases"):
        safeio.loads_yaml(bomb, "bomb.yaml")
    assert time.perf_counter() - t < 1.0
    # a few aliases of small anchors stay fine (configs use them)
    assert safeio.loads_yaml("a: &x [1, 2]\nb: *x\nc: *x\n", "ok.yaml") == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


@pytest.mark.parametrize("text, msg", [("a: &a [1, *a]", "refers to itself"), ("[" * 150 + "]" * 150, "nested more"),
                                       ("[" * DEEP + "]" * DEEP, "nested"), (f"x: {HUGE}", "integer of 5000"),
                                       (f"x: -{HUGE}", "integer of 5000 digits")])
def test_yaml_bounds(text, msg):
    with pytest.raises(Mgd3Error, match=msg):
        safeio.loads_yaml(text, "t")


@pytest.mark.parametrize("text, msg", [("[" * 150 + "]" * 150, "nested more"), ("[" * DEEP + "]" * DEEP, "nested"),
                                       (HUGE, "integer of 5000 digits"), (f'{{"a": [-{HUGE}]}}', "integer of 5000")])
def test_json_bounds(text, msg):
    with pytest.raises(Mgd3Error, match=msg):
        safeio.loads_json(text, "t")
    assert safeio.loads_json('{"a": [1, 2.5, -3, null, "' + "9" * 5000 + '"]}', "t")["a"][2] == -3


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "zero-link"
    link.symlink_to("/dev/zero")
    with deadline(10):
        for p, msg in [(fifo, "is a FIFO"), ("/dev/zero", "is a character device"), (link, "is a character device"),
                       (tmp_path, "is a folder"), (tmp_path / "none", "does not exist")]:
            with pytest.raises(Mgd3Error, match=msg):
                safeio.read_text(p)
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(Mgd3Error, match="larger than 1000 bytes"):
        safeio.read_json(big, 1000)
    assert safeio.read_text("/proc/self/status", 1 << 20).startswith("Name:")  # stat says 0 bytes; the bound holds


def test_gzip_bound_stops_while_inflating(tmp_path):
    f = tmp_path / "z.gz"
    with gzip.open(f, "wb", compresslevel=1) as g:
        for _ in range(64):
            g.write(bytes(1 << 20))
    with pytest.raises(Mgd3Error, match="inflates to more than 1 MiB"):
        safeio.read_gzip(f, 1 << 20)
    assert len(safeio.read_gzip(f, 64 << 20)) == 64 << 20


# --------------------------------------------------------------------------- through the CLI: --config


def test_config_fifo_does_not_hang(digits_model, tmp_path, capsys):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    out = tmp_path / "o"
    with deadline(30):
        refused(capsys, [*distill_args(digits_model, out), "--config", fifo], "is a FIFO", out)
    assert not out.exists()


@pytest.mark.parametrize("sub", ["distill", "evaluate", "report", "pretrain"])
def test_config_dev_zero_and_alias_bomb(sub, tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(levels))
    base = {"distill": ["distill", "--data", "digits", "--out", tmp_path / "o"],
            "evaluate": ["evaluate", tmp_path], "report": ["report", tmp_path, "--out", tmp_path / "r"],
            "pretrain": ["pretrain", "--data", "digits", "--out", tmp_path / "m"]}[sub]
    with deadline(30):
        refused(capsys, [*base, "--config", "/dev/zero"], "is a character device")
        t = time.perf_counter()
        refused(capsys, [*base, "--config", bomb], "expands through its aliases")
        assert time.perf_counter() - t < 2.0
    for what in ("o", "r", "m"):
        assert not (tmp_path / what).exists()


@pytest.mark.parametrize("text, msg", [(f"ipc: {HUGE}", "integer of 5000"), ("ipc: " + "[" * DEEP, "nested"),
                                       ("ipc: &a [*a]", "refers to itself")])
def test_config_huge_int_and_deep_nesting(digits_model, tmp_path, capsys, text, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    out = tmp_path / "o"
    refused(capsys, [*distill_args(digits_model, out), "--config", cfg], msg, out)
    assert not out.exists()


# --------------------------------------------------------------------------- class maps


@pytest.mark.parametrize("name, text, msg", [
    ("map.txt", f"0 {HUGE}\n", "label of 5000 digits"),
    ("map.json", f'{{"0": {HUGE}}}', "integer of 5000 digits"),
    ("map.json", '{"0": ' + "[" * DEEP + "]" * DEEP + "}", "nested"),
    ("map.json", b'{"0": "\xff\xfe"}', "is not a text (UTF-8) file"),
])
def test_class_map_bounds(digits_model, tmp_path, capsys, name, text, msg):
    cm = tmp_path / name
    cm.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "o"
    refused(capsys, distill_args(digits_model, out, "--class-map", cm), msg, out)
    assert not out.exists()


def test_class_map_fifo(digits_model, tmp_path, capsys):
    cm = tmp_path / "map.txt"
    os.mkfifo(cm)
    with deadline(30):
        line = refused(capsys, distill_args(digits_model, tmp_path / "o", "--class-map", cm))
    assert "map.txt is " in line  # "is not a file" (the flag's check) or "is a FIFO" (the reader's)


# --------------------------------------------------------------------------- model folders


@pytest.mark.parametrize("where", ["model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
                                   "vae/config.json", "mgd3.json"])
@pytest.mark.parametrize("kind", ["huge-int", "deep"])
def test_model_folder_json_bounds(digits_model, tmp_path, capsys, where, kind):
    def edit(m):
        f = m / where
        text = f.read_text() if f.exists() else '{"defaults": {"cfg": 1.0}}'
        if kind == "huge-int":
            text = text.rstrip().rstrip("}") + f', "x_huge": {HUGE}}}'
        else:
            text = text.rstrip().rstrip("}") + ', "x_deep": ' + "[" * DEEP + "]" * DEEP + "}"
        f.write_text(text)

    out = tmp_path / "o"
    msg = "integer of 5000 digits" if kind == "huge-int" else "nested"
    line = refused(capsys, distill_args(_model_with(digits_model, tmp_path, edit), out), msg, out)
    assert Path(where).name in line
    assert not out.exists()


# --------------------------------------------------------------------------- evaluate --option


@pytest.mark.parametrize("value, msg", [(HUGE, "integer of 5000"), ("[" * DEEP + "]" * DEEP, "nested"),
                                        ("&a [*a]", "refers to itself")])
def test_evaluate_option_bounds(a_set, capsys, value, msg):
    line = refused(capsys, ["evaluate", a_set, "--device", "cpu", "--quiet", "--option", f"lr={value}"], msg)
    assert "--option lr " in line
    assert not (a_set / "eval.json").exists()


# --------------------------------------------------------------------------- eval.json read by report


@pytest.mark.parametrize("content, msg", [
    (b'{"format": "mgd3-eval/1", "mean": 50.0, "x": "\xff"}', "is not a text (UTF-8) file"),
    (('{"format": "mgd3-eval/1", "mean": 50.0, "x": ' + "[" * DEEP + "]" * DEEP + "}").encode(), "nested"),
    (f'{{"format": "mgd3-eval/1", "mean": {HUGE}}}'.encode(), "integer of 5000 digits"),
])
@pytest.mark.parametrize("where", ["eval.json", "evals/x.json"])
def test_eval_json_bounds(a_set, tmp_path, capsys, content, msg, where):
    f = a_set / where
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(content)
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet"], msg)
    assert not (tmp_path / "r" / "report.md").exists()


def test_eval_json_fifo(a_set, tmp_path, capsys):
    os.mkfifo(a_set / "eval.json")
    with deadline(30):
        refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet"], "is a FIFO")


def test_manifest_bounds(a_set, tmp_path, capsys):
    f = a_set / "manifest.json"
    f.write_text(f.read_text().rstrip().rstrip("}") + f', "x": {HUGE}}}')
    refused(capsys, ["evaluate", a_set, "--device", "cpu", "--quiet"], "integer of 5000 digits")
    refused(capsys, ["report", a_set, "--out", tmp_path / "r", "--quiet"], "integer of 5000 digits")


# --------------------------------------------------------------------------- convert-ldm


@pytest.mark.parametrize("content, msg", [
    (f"model:\n  params:\n    x: {HUGE}\n".encode(), "integer of 5000"),
    (("model: " + "[" * DEEP).encode(), "nested"),
    (b"model:\n  params: \xff\xfe\n", "is not a text (UTF-8) file"),
])
def test_convert_ldm_config_bounds(tmp_path, capsys, content, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    (tmp_path / "m.ckpt").write_bytes(b"junk")
    refused(capsys, ["convert-ldm", tmp_path / "m.ckpt", "--config", cfg, "--out", tmp_path / "o"], msg)
    assert not (tmp_path / "o").exists()


def test_convert_ldm_fifo_config_and_checkpoint(tmp_path, capsys):
    os.mkfifo(tmp_path / "c.yaml")
    os.mkfifo(tmp_path / "m.ckpt")
    (tmp_path / "ok.yaml").write_text("model: {params: {}}\n")
    with deadline(30):
        refused(capsys, ["convert-ldm", tmp_path / "m.ckpt", "--config", tmp_path / "c.yaml", "--out",
                         tmp_path / "o"], "is a FIFO")


@pytest.mark.parametrize("kind, msg", [("huge", "integer of 5000 digits"), ("deep", "nested")])
def test_convert_ldm_labels_file_bounds(tmp_path, capsys, kind, msg):
    labels = tmp_path / "labels"
    labels.mkdir()
    inner = f'"0": {HUGE}' if kind == "huge" else '"0": ' + "[" * DEEP + "]" * DEEP
    (labels / "model_index.json").write_text('{"id2label": {' + inner + "}}")
    (tmp_path / "c.yaml").write_text("model: {params: {}}\n")
    (tmp_path / "m.ckpt").write_bytes(b"junk")
    refused(capsys, ["convert-ldm", tmp_path / "m.ckpt", "--config", tmp_path / "c.yaml", "--out", tmp_path / "o",
                     "--labels-from", labels], msg)


# --------------------------------------------------------------------------- Fashion-MNIST idx / gzip bomb


def _idx_bomb(folder: Path, inflated: int) -> None:
    """train-images with a valid header claiming 60000x28x28 and `inflated` bytes of zeros after it."""
    folder.mkdir()
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as g:
        g.write(struct.pack(">HBB3I", 0, 8, 3, 60000, 28, 28))
        chunk = bytes(1 << 20)
        for _ in range(inflated >> 20):
            g.write(chunk)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as g:
        g.write(struct.pack(">HBBI", 0, 8, 1, 60000) + bytes(60000))


def test_gzip_bomb_as_fashion_mnist(digits_model, tmp_path, capsys, monkeypatch):
    _idx_bomb(tmp_path / "fm", 256 << 20)  # ~250 KB on disk, 256 MiB inflated (> the 47 MB of the real file)
    monkeypatch.setenv("MGD3_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    out = tmp_path / "o"
    t = time.perf_counter()
    with deadline(60):
        refused(capsys, ["distill", "--data", "fashion-mnist", "--classes", "0", "--ipc", "1", "--model",
                         digits_model, "--out", out, *TINY_DISTILL], "inflates to more than 44 MiB", out)
    assert time.perf_counter() - t < 20
    from mgd3.io.data import load_data

    with pytest.raises(Mgd3Error, match="inflates to more than"):
        load_data("fashion-mnist", "train")


def test_fashion_mnist_files_still_read():
    from mgd3.io.arrays import FASHION_MNIST_DIR, read_idx

    root = Path(os.environ.get("MGD3_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    assert read_idx(root / "train-images-idx3-ubyte.gz", ndim=3).shape == (60000, 28, 28)
