"""`--method dm` (Distribution Matching, Zhao & Bilen 2023): end to end through the CLI on the
tiny digits model, resume after an interruption equals an uninterrupted run, the matching loss
goes down, siamese DSA draws the same parameters for batches of any size, and `--init DIR`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mgd3.methods.dm as dm
from mgd3.cli import main
from mgd3.evaluation.augment import DSAParams, dsa
from mgd3.evaluation.networks import build_network

BASE = ["--data", "digits", "--method", "dm", "--classes", "0", "1", "--ipc", "2", "--seed", "0", "--quiet",
        "--device", "cpu"]


def _distill(model, out, *extra) -> int:
    return main(["distill", "--model", str(model), "--out", str(out), *BASE, *map(str, extra)])


def _images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [e for e in err if e.startswith("mgd3: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_dm_end_to_end_writes_a_set(digits_model, tmp_path):
    out = tmp_path / "dm"
    assert _distill(digits_model, out, "--iterations", 3) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "dm" and len(m["images"]) == 4
    info = m["method_info"]
    assert info["training_free"] is False and info["iterations"] == 3 and info["dsa_same_params"] is True
    assert set(info["loss"]) == {"0", "1"}
    assert not (out / ".partial").exists()  # resume state is removed with the finished set
    # it moved away from its starting point, the random-real set of the same seed
    rr = tmp_path / "rr"
    assert main(["distill", "--model", str(digits_model), "--out", str(rr), "--data", "digits", "--method",
                 "random-real", "--classes", "0", "1", "--ipc", "2", "--seed", "0", "--quiet"]) == 0
    assert _images(out).keys() == _images(rr).keys() and _images(out) != _images(rr)


def test_dm_resume_after_interruption_equals_uninterrupted(digits_model, tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "CHECKPOINT_S", 0.0)  # a checkpoint after every iteration
    whole = tmp_path / "whole"
    assert _distill(digits_model, whole, "--iterations", 4) == 0

    calls = {"n": 0}
    real_loss = dm.matching_loss

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # class 1, iteration 2 (class 0 took 4)
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(dm, "matching_loss", interrupted)
    assert _distill(digits_model, part, "--iterations", 4) == 130
    assert not (part / "manifest.json").exists()
    state = torch.load(part / ".partial" / "dm-00001.pt", weights_only=True)
    assert state["iteration"] == 1  # class 1 stopped after one iteration

    resumed_from = []
    monkeypatch.setattr(dm, "matching_loss", real_loss)
    original = dm.optimise_class

    def spy(*a, **k):
        resumed_from.append(k["state"]["iteration"] if k.get("state") else 0)
        return original(*a, **k)

    monkeypatch.setattr(dm, "optimise_class", spy)
    assert _distill(digits_model, part, "--iterations", 4) == 0
    assert resumed_from == [1]  # class 0 was finished and written; class 1 continued after iteration 1
    assert _images(part) == _images(whole)
    loss = lambda o: json.loads((o / "manifest.json").read_text())["method_info"]["loss"]  # noqa: E731
    assert loss(part) == loss(whole)


def test_dm_matching_loss_decreases():
    """DM on a toy class: the loss under a fixed panel of fresh networks and real batches falls."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(64, 1, 8, 8, generator=g) * 0.5 + 1.0  # (N, C, R, R)
    syn = torch.randn(4, 1, 8, 8, generator=g)  # far from the real data

    def panel(images):
        total = 0.0
        for s in range(5):
            net = build_network("convnet-3", 1, 2, 8, seed=10_000 + s).requires_grad_(False)
            total += float(dm.matching_loss(net, real, images))
        return total / 5

    out = dm.optimise_class(syn, real, seed=0, class_id="a", iterations=30, lr=1.0, momentum=0.5, batch_real=32,
                            strategy="none", embed_net="convnet-3", num_classes=2)
    assert out["iteration"] == 30 and len(out["losses"]) == 30
    assert panel(out["images"]) < 0.5 * panel(syn)
    assert sum(out["losses"][-5:]) < sum(out["losses"][:5])


@pytest.mark.parametrize("seed", range(12))
def test_siamese_dsa_same_parameters_for_any_batch(seed):
    """Two generators with one seed give the real batch (256) and the synthetic one (IPC) the same
    op and parameters (DM's `DiffAugment(..., seed=seed)` on both), whatever the batch sizes."""
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(99))
    p = DSAParams(same_params=True)
    big = dsa(x, p, torch.Generator().manual_seed(seed))
    one = dsa(x[:1], p, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(big[:1], one)
    rep = dsa(x[:1].expand(3, -1, -1, -1), p, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(rep, one.expand(3, -1, -1, -1))  # one parameter set for the whole batch


def test_dm_init_from_a_distilled_set_and_its_checks(digits_model, tmp_path, capsys):
    init = tmp_path / "init"
    assert main(["distill", "--model", str(digits_model), "--out", str(init), "--data", "digits", "--method",
                 "plain", "--classes", "0", "1", "--ipc", "2", "--steps", "3", "--quiet"]) == 0
    # 0 iterations: the set comes back as it went in (up to one 8-bit level of float round trip)
    same = tmp_path / "same"
    assert _distill(digits_model, same, "--iterations", 0, "--init", init) == 0
    for rel in _images(init):
        a = np.asarray(Image.open(init / rel), dtype=int)
        b = np.asarray(Image.open(same / rel), dtype=int)
        assert np.abs(a - b).max() <= 1, rel
    assert json.loads((same / "manifest.json").read_text())["method_info"]["init"] == str(init)
    moved = tmp_path / "moved"
    assert _distill(digits_model, moved, "--iterations", 2, "--init", init) == 0
    assert _images(moved) != _images(same)
    capsys.readouterr()

    # another IPC
    bad = tmp_path / "bad-ipc"
    assert main(["distill", "--model", str(digits_model), "--out", str(bad), "--data", "digits", "--method", "dm",
                 "--classes", "0", "1", "--ipc", "3", "--iterations", "1", "--init", str(init), "--quiet"]) == 2
    assert "IPC 2" in _one_error_line(capsys) and not bad.exists()
    # other classes
    assert main(["distill", "--model", str(digits_model), "--out", str(bad), "--data", "digits", "--method", "dm",
                 "--classes", "0", "1", "2", "--ipc", "2", "--iterations", "1", "--init", str(init),
                 "--quiet"]) == 2
    assert "lacks class '2'" in _one_error_line(capsys) and not bad.exists()
    # a set of another data set with the same class ids, size and channels (an image folder)
    folder = tmp_path / "folder"
    for cid in ("0", "1"):
        (folder / cid).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((8, 8), 40 * k + 100 * int(cid), dtype=np.uint8)).save(folder / cid / f"{k}.png")
    other = tmp_path / "other"
    assert main(["distill", "--model", str(digits_model), "--out", str(other), "--data", str(folder), "--method",
                 "random-real", "--ipc", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert _distill(digits_model, bad, "--iterations", 1, "--init", other) == 2
    assert f"is a set of data {str(folder)!r}, not 'digits'" in _one_error_line(capsys) and not bad.exists()
    # not a set at all
    assert _distill(digits_model, bad, "--iterations", 1, "--init", tmp_path / "nope") == 2
    _one_error_line(capsys)
    assert _distill(digits_model, bad, "--iterations", -1) == 2
    assert "--iterations" in _one_error_line(capsys)


def test_class_by_class_equals_the_joint_loop():
    """The official loop sums every class's term under one network per iteration and takes one SGD
    step on all images; the gradient of a class's images comes from its own term and SGD acts
    element-wise, so optimising class by class (same network seeds) gives the same images."""
    g = torch.Generator().manual_seed(1)
    reals = {"a": torch.randn(40, 1, 8, 8, generator=g) + 1, "b": torch.randn(40, 1, 8, 8, generator=g) - 1}
    syns = {"a": torch.randn(2, 1, 8, 8, generator=g), "b": torch.randn(2, 1, 8, 8, generator=g)}
    images = torch.cat([syns["a"], syns["b"]]).clone().requires_grad_(True)  # (4, 1, 8, 8)
    opt = torch.optim.SGD([images], lr=1.0, momentum=0.5)
    p = DSAParams(same_params=True)
    for it in range(5):
        net = build_network("convnet-3", 1, 2, 8, seed=dm._seed(0, "net", it)).requires_grad_(False)
        loss = 0.0
        for j, cid in enumerate("ab"):
            idx = np.random.default_rng(dm._seed(0, "real", cid, it)).choice(40, size=16, replace=False)
            s = dm._seed(0, "dsa", cid, it)
            x_real = dsa(reals[cid][torch.from_numpy(idx)], p, torch.Generator().manual_seed(s))
            x_syn = dsa(images[2 * j:2 * j + 2], p, torch.Generator().manual_seed(s))
            loss = loss + dm.matching_loss(net, x_real, x_syn)
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_class = torch.cat([dm.optimise_class(syns[c], reals[c], seed=0, class_id=c, iterations=5, lr=1.0,
                                             momentum=0.5, batch_real=16, strategy=dm.DEFAULT_STRATEGY,
                                             embed_net="convnet-3", num_classes=2)["images"] for c in "ab"])
    torch.testing.assert_close(per_class, images.detach(), rtol=1e-5, atol=1e-5)
