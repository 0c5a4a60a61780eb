"""mgd3 evaluate: networks, augmentations, protocols, the training loop, references, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mgd3.errors import Mgd3Error
from mgd3.evaluation import augment as A
from mgd3.evaluation import protocols as P
from mgd3.evaluation.core import EvalConfig, evaluate, read_set
from mgd3.evaluation.networks import NETWORKS, build_network
from mgd3.evaluation.train import Normalization, RunOptions, TensorSet, lr_factor, train_and_test

QUIET = RunOptions(device="cpu", progress=False)

# one torch thread: on a shared CPU, two OpenMP threads stall each other (several x slower)
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- fixtures


def write_set(root: Path, ipc: int = 3, manifest: bool = True, data_name: str = "digits") -> Path:
    """A distilled set in the mgd3 layout made of real digits train images (hand-written manifest)."""
    from PIL import Image

    from mgd3.io.data import load_data

    data = load_data(data_name, "train")
    classes, images = [], []
    for c, cid in enumerate(data.class_ids):
        classes.append({"class_id": cid, "name": data.class_names[c], "class_index": c, "label": None})
        for k, i in enumerate(data.indices(c)[:ipc]):
            x, _ = data.dataset([i])[0]
            arr = ((x[0].numpy() + 1) * 127.5).round().astype(np.uint8)  # (8, 8) grayscale
            rel = f"images/{cid}/{k}.png"
            (root / "images" / cid).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            images.append({"path": rel, "class_id": cid, "class_index": c, "label": None, "index": k,
                           "seed": 0, "mode_id": None})
    if manifest:
        m = {"format": "mgd3-distilled-set/1", "method": "hand-made", "ipc": ipc, "seed": 0,
             "data": {"name": data_name, "classes": None, "resolution": 8, "channels": 1, "data_root": None},
             "classes": classes, "images": images}
        (root / "manifest.json").write_text(json.dumps(m))
    return root


@pytest.fixture
def digits_set(tmp_path):
    return write_set(tmp_path / "set")


def separable(n_per_class: int, classes: int = 4, r: int = 8, seed: int = 0) -> TensorSet:
    """Class c = a bright quadrant c on noise: trivially separable, (N, 1, r, r) uint8."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n_per_class * classes, 1, r, r), generator=g, dtype=torch.uint8)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    h = r // 2
    for i, c in enumerate(y.tolist()):
        x[i, 0, (c // 2) * h:(c // 2 + 1) * h, (c % 2) * h:(c % 2 + 1) * h] += 180
    return TensorSet(x, y)


NORM = Normalization((0.3,), (0.3,), "test")


def tiny(name: str, **kw) -> P.Protocol:
    p = P.resolve(P.get_protocol(name), ipc=10, num_classes=4, n_images=40, set_resolution=8, data_name="toy")
    return P.override(p, **kw)


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("arch", NETWORKS.names())
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res", [8, 28, 32, 64])
def test_network_output_shapes(arch, channels, res):
    net = build_network(arch, channels, 7, res, seed=0)
    sizes = []  # instance norm of a 1x1 map would erase it: never let that happen
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
    with torch.no_grad():
        assert net(torch.randn(2, channels, res, res)).shape == (2, 7)
    assert sizes and min(sizes) >= 2


def test_convnet3_matches_dc_layout():
    net = build_network("convnet-3", 1, 10, 28)
    assert net.classifier.in_features == 128 * 4 * 4  # 28 -> padding 3 -> 32 -> 16 -> 8 -> 4
    assert net.features[0].padding == (3, 3)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 for m in norms)  # instance norm
    assert build_network("convnet-3", 3, 10, 32).classifier.in_features == 128 * 4 * 4


def test_network_seed_fixes_weights():
    a, b = build_network("resnetap-10", 3, 10, 32, seed=5), build_network("resnetap-10", 3, 10, 32, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_arch_is_one_line_error():
    with pytest.raises(Mgd3Error, match="unknown network 'vgg-11'; known: convnet-3") as e:
        build_network("vgg-11", 1, 10, 28)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("op", list(A.DSA_OPS))
def test_dsa_ops_keep_shape_and_share_params_across_batch(op):
    x = torch.randn(16, 3, 16, 16)
    same_img = x[:1].expand(16, -1, -1, -1).contiguous()

    def apply(inp, same, seed):
        g = torch.Generator().manual_seed(seed)
        out = inp
        for f in A.DSA_OPS[op]:
            out = f(out, A.DSAParams(same_params=same), g, same)
        return out

    assert apply(x, True, 0).shape == x.shape and apply(x, False, 0).shape == x.shape
    shared = apply(same_img, True, 3)  # one parameter set: identical images stay identical
    assert all(torch.allclose(shared[0], shared[k], atol=1e-6) for k in range(16))
    per_image = apply(same_img, False, 3)  # per-image parameters: they differ
    assert not all(torch.allclose(per_image[0], per_image[k], atol=1e-6) for k in range(16))
    assert torch.equal(apply(x, False, 7), apply(x, False, 7))  # same seed, same result


def test_dsa_one_op_per_batch_and_no_flip_for_digits():
    x = torch.randn(4, 1, 8, 8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(A.dsa(x, A.DSAParams(), g1), A.dsa(x, A.DSAParams(), g2))
    assert torch.equal(A.dsa(x, A.DSAParams(strategy="flip", flip=1.0), g1), x.flip(3))
    p = P.resolve(P.get_protocol("dc-dsa"), ipc=10, num_classes=10, n_images=100, set_resolution=8,
                  data_name="digits")
    assert p.dsa.strategy == "color_crop_cutout_scale_rotate" and p.epochs == 1000
    q = P.resolve(P.get_protocol("dc-dsa"), ipc=10, num_classes=10, n_images=100, set_resolution=28,
                  data_name="fashion-mnist")
    assert q.dsa.strategy == "color_crop_cutout_flip_scale_rotate"


def test_minimax_transforms_and_cutmix():
    x = torch.rand(5, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    y = A.minimax_transform(x, g)
    assert y.shape == x.shape
    c = A.random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # whole image: identity
    assert torch.allclose(c, x, atol=1e-5)
    mixed, perm, ratio = A.cutmix(x, 1.0, g, np.random.default_rng(0))
    assert mixed.shape == x.shape and 0.0 <= ratio <= 1.0 and sorted(perm.tolist()) == list(range(5))
    kept = (mixed == x).all(1).float().mean().item()  # share of pixels left alone (perm may map i->i)
    assert kept >= ratio - 1e-6


# --------------------------------------------------------------------------- protocols


def test_protocol_hyperparameters_follow_spec():
    dc = P.get_protocol("dc")
    assert (dc.arch, dc.epochs, dc.lr, dc.momentum, dc.weight_decay, dc.batch_size) == \
        ("convnet-3", 300, 0.01, 0.9, 5e-4, 256)
    assert (P.minimax_epochs(1, 10), P.minimax_epochs(10, 10), P.minimax_epochs(50, 10),
            P.minimax_epochs(200, 10), P.minimax_epochs(10, 100)) == (3000, 2000, 1500, 1000, 1300)
    mm = P.resolve(P.get_protocol("minimax"), ipc=10, num_classes=10, n_images=100, set_resolution=256,
                   data_name="imagenette")
    assert (mm.arch, mm.epochs, mm.eval_every, mm.resolution, mm.batch_size) == ("resnetap-10", 2000, 20, 224, 64)
    assert mm.cutmix_beta == 1.0 and mm.report == "best" and "every 20 epochs" in mm.describe()
    assert [lr_factor(mm, e, 2000) for e in (0, 1332, 1333, 1665, 1666)] == \
        pytest.approx([1, 1, 0.2, 0.2, 0.04])
    soft = P.get_protocol("soft")
    assert (soft.optimizer, soft.lr, soft.weight_decay, soft.loss) == ("adamw", 1e-3, 0.01, "kl")
    d = P.resolve(dc, ipc=10, num_classes=10, n_images=100, set_resolution=28, data_name="fashion-mnist")
    # DC code: 301 passes, lr x0.1 after pass 151 (0-based)
    assert lr_factor(d, 151, 301) == 1.0 and lr_factor(d, 152, 301) == pytest.approx(0.1)


def test_unknown_protocol_is_one_line_error():
    with pytest.raises(Mgd3Error, match="unknown protocol 'kip'; known: dc, dc-dsa, minimax, soft"):
        P.get_protocol("kip")
    with pytest.raises(Mgd3Error, match="unknown protocol option"):
        P.override(P.get_protocol("dc"), nonsense=1)


# --------------------------------------------------------------------------- the training loop


def test_separable_set_is_learned_and_shuffled_labels_are_not():
    train, test = separable(10), separable(25, seed=1)
    p = tiny("dc", epochs=15, batch_size=16)
    good = train_and_test(p, train, test, seed=0, num_classes=4, norm=NORM, opts=QUIET)
    assert good["final_acc"] >= 95.0
    g = torch.Generator().manual_seed(0)
    shuffled = TensorSet(train.images, train.targets[torch.randperm(len(train), generator=g)])
    bad = train_and_test(p, shuffled, test, seed=0, num_classes=4, norm=NORM, opts=QUIET)
    assert bad["final_acc"] <= 50.0  # chance is 25 %


def test_same_seed_same_result_and_best_epoch_reporting():
    train, test = separable(4), separable(5, seed=1)
    p = tiny("minimax", epochs=4, eval_every=1, batch_size=8)
    a = train_and_test(p, train, test, seed=3, num_classes=4, norm=NORM, opts=QUIET)
    b = train_and_test(p, train, test, seed=3, num_classes=4, norm=NORM, opts=QUIET)
    assert a["evaluations"] == b["evaluations"] and len(a["evaluations"]) == 4
    assert a["final_acc"] == a["best_acc"] == max(e[1] for e in a["evaluations"])
    assert a["last_acc"] == a["evaluations"][-1][1]


def test_bf16_autocast_learns_and_reports_its_own_accuracy():
    from mgd3.evaluation.train import accuracy

    train, test = separable(10), separable(25, seed=1)
    p = tiny("dc", epochs=15, batch_size=16)
    bf16 = train_and_test(p, train, test, seed=0, num_classes=4, norm=NORM, return_model=True,
                          opts=RunOptions(device="cpu", bf16=True, progress=False))
    fp32 = train_and_test(p, train, test, seed=0, num_classes=4, norm=NORM, return_model=True, opts=QUIET)
    assert bf16["final_acc"] >= 95.0  # the same bar as fp32 on this separable set
    again = accuracy(bf16["model"], test, NORM, device=torch.device("cpu"), bf16=True)
    assert bf16["final_acc"] == round(again, 2)  # the reported number is the model's accuracy
    w16, w32 = (r["model"].state_dict() for r in (bf16, fp32))
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)  # autocast really changed the arithmetic


# --------------------------------------------------------------------------- end to end


def _check_eval_json(path: Path, protocol: str, arch: str, n_images: int, seeds: list[int]) -> dict:
    from mgd3 import __version__

    d = json.loads(path.read_text())
    assert d["format"] == "mgd3-eval/1" and d["mgd3_version"] == __version__
    assert d["protocol"]["name"] == protocol and d["arch"] == arch and d["data"]["name"] == "digits"
    assert d["set"]["num_images"] == n_images and d["data"]["test_images"] == 360
    assert [r["seed"] for r in d["runs"]] == seeds
    for r in d["runs"]:
        assert {"final_acc", "best_acc", "best_epoch", "last_acc", "train_seconds"} <= set(r)
    assert d["mean"] == pytest.approx(np.mean([r["final_acc"] for r in d["runs"]]), abs=0.01)
    assert d["std"] == pytest.approx(np.std([r["final_acc"] for r in d["runs"]]), abs=0.01)
    assert {"lr", "momentum", "weight_decay", "batch_size", "epochs"} <= set(d["protocol"])
    assert d["reported"]
    return d


@pytest.mark.slow
@pytest.mark.parametrize("protocol,arch", [("dc", None), ("dc-dsa", None), ("minimax", None),
                                           ("soft", "convnet-3")])
def test_all_protocols_end_to_end(digits_set, protocol, arch):
    cfg = EvalConfig(set_dir=str(digits_set), protocol=protocol, arch=arch, seeds=[0, 1], epochs=2,
                     device="cpu", teacher_epochs=1, progress=False)
    r = evaluate(cfg)
    d = _check_eval_json(digits_set / "eval.json", protocol, arch or P.get_protocol(protocol).arch, 30, [0, 1])
    assert r["mean"] == d["mean"]
    if protocol == "soft":
        assert 0 <= d["teacher"]["test_acc"] <= 100 and Path(d["teacher"]["cache_file"]).is_file()
    if protocol == "dc":
        assert d["normalization"]["source"] == "real train split"
    assert (digits_set / "evals").is_dir()


def test_dc_end_to_end_and_eval_json(digits_set):
    r = evaluate(EvalConfig(set_dir=str(digits_set), protocol="dc", seeds=[0, 1], epochs=3, device="cpu",
                            progress=False))
    d = _check_eval_json(digits_set / "eval.json", "dc", "convnet-3", 30, [0, 1])
    assert d["protocol"]["epochs"] == 3 and d["runs"][0]["epochs"] == 4  # DC code: epochs + 1 passes
    assert d["set"]["ipc"] == 3 and d["set"]["method"] == "hand-made" and r["out"].endswith("eval.json")
    assert not list(digits_set.glob(".*.tmp"))  # written atomically


def test_missing_manifest_is_one_line_error(tmp_path):
    s = write_set(tmp_path / "set", manifest=False)
    with pytest.raises(Mgd3Error, match=r"is not a complete distilled set \(no manifest.json\)") as e:
        read_set(s)
    assert "\n" not in str(e.value)


def test_plain_image_folder_is_accepted(tmp_path):
    s = write_set(tmp_path / "set", ipc=2, manifest=False)
    d = read_set(s / "images")  # class sub-folders, no manifest
    assert d.manifest is None and len(d.files) == 20 and d.ipc == 2 and d.class_ids[0] == "0"


def test_references_are_cached_and_give_ior(digits_set, monkeypatch):
    base = dict(data="digits", protocol="dc", seeds=[0], epochs=2, device="cpu", progress=False)
    r1 = evaluate(EvalConfig(reference="random-real", ipc=3, **base))
    assert r1["set"]["num_images"] == 30 and r1["subset_seeds"] == [0]
    import mgd3.evaluation.references as R

    def boom(*a, **k):
        raise AssertionError("trained again")

    with monkeypatch.context() as m:  # (not monkeypatch.undo(): that would undo conftest's cache dir too)
        m.setattr(R, "train_and_test", boom)
        r2 = evaluate(EvalConfig(reference="random-real", ipc=3, **base))  # from the cache
    assert r2["runs"] == r1["runs"]
    evaluate(EvalConfig(reference="full", **{**base, "epochs": 1}))
    d = evaluate(EvalConfig(set_dir=str(digits_set), **{k: v for k, v in base.items() if k != "data"}))
    assert d["ior"] == pytest.approx(d["mean"] - r1["mean"], abs=0.01)
    assert d["references"]["full"]["epochs"] == 1 and "hlr" in d


def test_a_set_gets_its_random_real_baseline_trained_and_cached(digits_set, caplog):
    """No reference cached: evaluating a set trains the random-real reference of its IPC, protocol
    and seeds once (logged with its time), so eval.json has IOR; --no-reference skips it."""
    import logging

    from mgd3.cli import main

    assert main(["evaluate", str(digits_set), "--protocol", "dc", "--seeds", "0", "--epochs", "1", "--device",
                 "cpu", "--quiet", "--no-reference"]) == 0
    d0 = json.loads((digits_set / "eval.json").read_text())
    assert "ior" not in d0 and "references" not in d0
    base = dict(protocol="dc", seeds=[0, 1], epochs=1, device="cpu", progress=False)
    with caplog.at_level(logging.INFO, logger="mgd3"):
        d = evaluate(EvalConfig(set_dir=str(digits_set), **base))
    assert any("training it now on 2 seeds (about" in r.getMessage() for r in caplog.records)
    rr = d["references"]["random_real"]
    assert rr["ipc"] == 3 and rr["seeds"] == [0, 1] and Path(rr["cache_file"]).is_file()
    ref = evaluate(EvalConfig(reference="random-real", ipc=3, data="digits", **base))  # what it trained
    assert ref["mean"] == rr["mean"] and d["ior"] == pytest.approx(d["mean"] - ref["mean"], abs=0.01)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mgd3"):
        again = evaluate(EvalConfig(set_dir=str(digits_set), **base))  # cached now: not trained again
    assert not any("training it now" in r.getMessage() for r in caplog.records)
    assert again["references"]["random_real"]["mean"] == rr["mean"]


def test_random_real_subsets_are_fixed_by_seed():
    from mgd3.evaluation.references import random_real_indices

    t = np.repeat(np.arange(3), 20)
    a, b = random_real_indices(t, 3, 5, 0), random_real_indices(t, 3, 5, 0)
    assert np.array_equal(a, b) and len(a) == 15 and not np.array_equal(a, random_real_indices(t, 3, 5, 1))
    assert all((t[a] == c).sum() == 5 for c in range(3))


# --------------------------------------------------------------------------- CLI


def _parse(argv):
    from mgd3.cli.evaluate import add_parser

    ap = argparse.ArgumentParser(prog="mgd3")
    add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(argv)


def test_cli_run_prints_one_line_summary(digits_set, capsys):
    from mgd3.cli.evaluate import run

    args = _parse(["evaluate", str(digits_set), "--epochs", "1", "--seeds", "0", "--quiet", "--device", "cpu"])
    assert run(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("dc · convnet-3 · 30 images (10 classes × IPC 3)")
    assert "eval.json" in out[0]


@pytest.mark.parametrize("argv,msg", [
    (["evaluate", "{missing}"], "is not a complete distilled set (no manifest.json)"),
    (["evaluate", "{set}", "--arch", "vgg-11"], "unknown network 'vgg-11'"),
    (["evaluate", "--reference", "random-real", "--data", "digits"], "needs --ipc"),
])
def test_cli_errors_are_one_line(tmp_path, digits_set, capsys, argv, msg):
    from mgd3.cli import main

    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "images").mkdir()
    argv = [a.format(missing=tmp_path / "missing", set=digits_set) for a in argv]
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mgd3: error: ") and msg in err[-1]


def test_cli_unknown_protocol_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["evaluate", "x", "--protocol", "kip"])
    assert e.value.code == 2 and "invalid choice: 'kip'" in capsys.readouterr().err
