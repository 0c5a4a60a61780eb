"""`torchrun --nproc_per_node N -m mgd3 distill` as real processes, on the tiny DiT: the set of
two processes is the set of one, bit for bit; a process that fails stops the launch with one
`mgd3: error:` line and no manifest.

Every launch runs with OMP_NUM_THREADS=1 per process (a CPU rounds the same only with the
same threads) and --device cpu.
"""

import io
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

ARGS = ["--method", "mgd3", "--ipc", "3", "--classes", "0", "1", "2", "--steps", "4", "--batch-size", "2",
        "--seed", "5", "--quiet", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MGD3_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")


def start(argv, cache: Path, nproc: int | None) -> subprocess.Popen:
    """`python -m mgd3 ...` (nproc None) or `python -m torch.distributed.run --nproc_per_node N -m mgd3 ...`."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                                         str(nproc), "--master_port", str(free_port())]
    cmd = [sys.executable, *launcher, "-m", "mgd3", *map(str, argv)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache),
                            cwd=ROOT)


def finish(p: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def mgd3_frames(stderr: str) -> list[str]:
    """Traceback lines in mgd3's own code (torchrun prints its own when a process fails)."""
    return [line for line in stderr.splitlines() if line.lstrip().startswith("File ") and "/mgd3/" in line]


def files_of(out: Path) -> dict[str, bytes]:
    """Every file of a set but the manifest (compared apart), by path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def comparable(manifest: dict) -> dict:
    """A manifest without what depends on the machine, the time or where the set went (the stage
    profile is each process's own work)."""
    m = dict(manifest)
    for k in ("timing_s", "machine", "profile"):
        m.pop(k)
    m["config"] = {k: v for k, v in m["config"].items() if k != "out"}
    return m


@pytest.mark.slow
def test_two_processes_write_the_set_one_process_writes(digits_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # started together (the set does not depend on what else runs); each with its own encoding cache
    p1 = start(["distill", "--data", "digits", "--model", digits_model, "--out", one, *ARGS], tmp_path / "c1", None)
    p2 = start(["distill", "--data", "digits", "--model", digits_model, "--out", two, *ARGS], tmp_path / "c2", 2)
    r1, r2 = finish(p1), finish(p2)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("wrote 9 images") == 1, r2.stdout  # rank 0 reports, once

    f1, f2 = files_of(one), files_of(two)
    pngs = [k for k in f1 if k.startswith("images/")]
    assert len(pngs) == 9 and sorted(f1) == sorted(f2)
    assert not any(k.startswith(".partial") for k in f2)  # removed once the manifest is written
    for k in pngs + ["grid.png"]:
        assert f1[k] == f2[k], k
    l1, l2 = (torch.load(d / "latents.pt", weights_only=True) for d in (one, two))
    assert torch.equal(l1["latents"], l2["latents"])
    assert l1["paths"] == l2["paths"] and l1["labels"] == l2["labels"]

    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["machine"]["processes"] == 1 and m2["machine"]["processes"] == 2
    assert m2["machine"]["threads"] == m1["machine"]["threads"] == 1
    assert len(m2["timing_s"]["ranks"]) == 2
    assert m1["images"] == m2["images"]
    assert comparable(m1) == comparable(m2)
    k1, k2 = (json.loads((d / ".mgd3-run.json").read_text()) for d in (one, two))
    assert k1["key"] == k2["key"] and k2["info"]["processes"] == 2


@pytest.mark.slow
def test_rank_0_failing_stops_the_launch_with_one_error_line(digits_model, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    r = finish(start(["distill", "--data", "digits", "--model", digits_model, "--out", out, *ARGS],
                     tmp_path / "c", 2))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("mgd3: error:")]
    assert errors == [f"mgd3: error: output {out} exists and is not a folder"], r.stderr
    assert not mgd3_frames(r.stderr), r.stderr
    assert out.read_text() == "not a folder"
    assert not (tmp_path / "a-file" / "manifest.json").exists()


def _damaged_png() -> bytes:
    """A PNG whose header and chunk checksums are fine but whose pixel data does not decompress:
    the up-front file check passes it, reading it fails."""
    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    i = b.index(b"IDAT")
    n = struct.unpack(">I", b[i - 4:i])[0]
    b[i + 4:i + 4 + n] = bytes([0x55]) * n
    b[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(b[i:i + 4 + n])))
    return bytes(b)


@pytest.mark.slow
def test_rank_1_failing_stops_rank_0_with_one_error_line(digits_model, tmp_path):
    """Rank 1 (class 1) cannot read an image while encoding; rank 0 notices, stops, writes nothing.
    The file passes the load-time check (a damaged PNG is skipped there since the image checks
    decode it): the read fails in rank 1 alone, injected at its start (sitecustomize)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    data = tmp_path / "imgs"
    for c in range(3):
        (data / str(c)).mkdir(parents=True)
        for k, img in enumerate(d.images[d.target == c][:5]):
            Image.fromarray((img * 255 / 16).round().astype(np.uint8), mode="L").save(data / str(c) / f"{k}.png")
    (data / "1" / "4.png").rename(data / "1" / "9.png")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mgd3.images, mgd3.io.sources\n"
        "    from mgd3.errors import Mgd3Error\n"
        "    real = mgd3.images.read_image\n"
        "    def read_image(path, *a, **k):\n"
        "        if str(path).endswith('9.png'):\n"
        "            raise Mgd3Error(f'cannot read image {path}: damaged (an injected fault)')\n"
        "        return real(path, *a, **k)\n"
        "    mgd3.images.read_image = read_image\n"
        "    if hasattr(mgd3.io.sources, 'read_image'):\n"
        "        mgd3.io.sources.read_image = read_image\n")
    out = tmp_path / "set"
    argv = ["distill", "--data", data, "--model", digits_model, "--out", out, "--ipc", "2", "--steps", "4",
            "--quiet", "--device", "cpu"]
    env_path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["PYTHONPATH"], old_path = env_path, os.environ.get("PYTHONPATH")
    try:
        r = finish(start(argv, tmp_path / "c", 2))
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("mgd3: error:")]
    assert len(errors) == 1 and "cannot read image" in errors[0] and "9.png" in errors[0], r.stderr
    assert not mgd3_frames(r.stderr), r.stderr
    assert not (out / "manifest.json").exists()
    assert not (out / "latents.pt").exists()
