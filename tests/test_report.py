"""mgd3 report: exact metric values on hand-computed cases, embeddings, the accuracy rows, and the
real CLI end to end on two tiny distilled sets (tiny DiT, digits)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from mgd3.cli import main
from mgd3.errors import Mgd3Error
from mgd3.report import (EMBEDDINGS, ReportConfig, SetInfo, accuracy_rows, cosine_similarity, diversity, embed,
                         mode_coverage, nearest_mode, report, representativeness, set_metrics)

R2 = 1 / math.sqrt(2)


# --------------------------------------------------------------------------- metrics, exact


def test_cosine_similarity_flattens_and_ignores_scale():
    a = np.array([[2.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [0.0, 3.0]])
    assert cosine_similarity(a, b) == pytest.approx(np.array([[R2, 0.0], [0.0, 0.0]]))  # zero row -> 0
    assert cosine_similarity(a.reshape(2, 1, 2, 1), b.reshape(2, 2, 1)) == pytest.approx(cosine_similarity(a, b))


def test_diversity_exact():
    assert diversity(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)  # orthogonal
    assert diversity(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(2.0)  # opposite
    assert diversity(np.array([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(0.0)  # same direction
    # pairs (1,2): cos 1, (1,3): 0, (2,3): 0 -> 1 - 1/3
    assert diversity(np.array([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0]])) == pytest.approx(2 / 3)
    # pairs: cos 0, 1/√2, 1/√2
    assert diversity(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(1 - 2 * R2 / 3)
    assert math.isnan(diversity(np.ones((1, 4))))
    assert diversity(np.eye(4).reshape(4, 1, 2, 2)) == pytest.approx(1.0)  # (n, C, h, w) flattened


def test_representativeness_exact():
    real = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # d=[1,0]: cos to real 1, 0, 1/√2 -> top-2 mean (1 + 1/√2)/2
    assert representativeness(np.array([[1.0, 0.0]]), real, k=2) == pytest.approx((1 + R2) / 2)
    # d=[-1,0]: cos -1, 0, -1/√2 -> top-2 mean (0 - 1/√2)/2; mean over both distilled = 1/4
    d = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert representativeness(d, real, k=2) == pytest.approx(0.25)
    assert representativeness(d, real, k=1) == pytest.approx((1.0 + 0.0) / 2)
    # k larger than the real set: all of it; here the two rows cancel exactly
    assert representativeness(d, real, k=50) == pytest.approx(0.0)
    assert math.isnan(representativeness(np.zeros((0, 2)), real))
    with pytest.raises(Mgd3Error):
        representativeness(d, real, k=0)


def test_nearest_mode_and_coverage_exact():
    modes = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    d = np.array([[1.0, 1.0], [9.0, 0.0], [2.0, 1.0]])
    assert nearest_mode(d, modes).tolist() == [0, 1, 0]
    covered, assign = mode_coverage(d, modes)
    assert covered == 2 and assign.tolist() == [0, 1, 0]
    assert nearest_mode(np.array([[5.0, 0.0]]), modes).tolist() == [0]  # tie -> the lower index
    assert mode_coverage(np.array([[0.0, 9.0], [11.0, 1.0], [-1.0, 0.0]]), modes)[0] == 3
    assert mode_coverage(np.zeros((0, 2)), modes)[0] == 0


def test_set_metrics_uses_kmeans_modes_of_the_real_latents():
    rng = np.random.default_rng(0)
    a, b = np.array([0.0, 0.0, 5.0]), np.array([5.0, 0.0, 0.0])
    real = np.concatenate([a + 0.01 * rng.normal(size=(20, 3)), b + 0.01 * rng.normal(size=(20, 3))])
    both = np.stack([a, b])  # one distilled latent at each cluster
    one = np.stack([a, a + 0.02])  # both in the same cluster
    m = set_metrics({"x": both, "y": one}, {"x": real, "y": real}, ipc=2, neighbors=5)
    px, py = m["per_class"]["x"], m["per_class"]["y"]
    assert (px["covered"], px["modes"], px["coverage"]) == (2, 2, 1.0)
    assert (py["covered"], py["coverage"]) == (1, 0.5)
    assert m["coverage"] == pytest.approx(0.75) and (m["covered"], m["modes"]) == (3, 4)
    assert px["diversity"] == pytest.approx(1.0)  # a ⟂ b
    assert px["representativeness"] == pytest.approx(1.0, abs=1e-3)  # each sits on 20 real latents
    assert m["diversity"] == pytest.approx((px["diversity"] + py["diversity"]) / 2)
    with pytest.raises(Mgd3Error, match="no real images"):
        set_metrics({"z": both}, {"x": real}, ipc=2)


# --------------------------------------------------------------------------- embeddings and accuracy rows


def test_embeddings_and_tiny_fallback():
    from threadpoolctl import threadpool_limits

    x = np.random.default_rng(0).normal(size=(12, 6))
    with threadpool_limits(1):  # OpenMP on a busy shared CPU is many times slower than one thread
        xy, used = embed("tsne", x)
    assert used == "tsne" and xy.shape == (12, 2) and np.isfinite(xy).all()
    xy, used = embed("tsne", x[:4])  # too few points for t-SNE
    assert used == "pca" and xy.shape == (4, 2)
    assert embed("pca", x[:1])[0].tolist() == [[0.0, 0.0]]
    assert embed("pca", x[:2, :1])[0].shape == (2, 2)  # one feature: the second column is zero
    with pytest.raises(Mgd3Error, match="pca, tsne"):
        EMBEDDINGS.get("umap")


def _eval(mean, rr=None, rr_ipc=2, full=None):
    refs = {}
    if rr is not None:
        refs["random_real"] = {"mean": rr, "std": 1.0, "ipc": rr_ipc}
    if full is not None:
        refs["full"] = {"mean": full, "std": 0.1}
    return {"format": "mgd3-eval/1", "set": {"method": "mgd3", "ipc": 2, "generation_seed": 0},
            "protocol": {"name": "dc", "epochs": 300}, "arch": "convnet3", "seeds": [0, 1, 2], "mean": mean,
            "std": 0.5, "train_seconds": 9.0, "references": refs}


def test_accuracy_rows_ior_recovery_hlr():
    s = SetInfo(Path("x"), "x", {"method": "mgd3", "ipc": 2, "seed": 0}, [_eval(60.0, rr=50.0, full=80.0)])
    (row,) = accuracy_rows(s)
    assert (row["mean"], row["ior"], row["recovery"], row["hlr"]) == (60.0, 10.0, 0.75, 20.0)
    assert row["lrs"] == 0.2482  # DD-Ranking: (e^a - e^-1) / (e - e^-1), a = 0.5 * 0.10 - 0.5 * 0.20
    assert row["ars"] is None  # one protocol only
    assert row["eval_seconds"] == 9.0 and row["protocol"] == "dc" and row["arch"] == "convnet3"
    s.evals = [_eval(60.0, rr=50.0, rr_ipc=10)]  # a reference of another IPC is not used
    (row,) = accuracy_rows(s)
    assert row["ior"] is None and row["recovery"] is None and row["hlr"] is None and row["lrs"] is None
    s.evals = []
    assert accuracy_rows(s) == []


def test_accuracy_rows_take_a_reference_trained_later_from_the_cache(tmp_path):
    from mgd3.evaluation.references import cache_root, write_json_atomic

    protocol = {"name": "dc", "arch": "convnet-3", "resolution": 28, "epochs": 300}
    ev = {**_eval(60.0), "protocol": protocol, "data": {"train_fingerprint": "fp1"}}
    s = SetInfo(Path("x"), "x", {"method": "mgd3", "ipc": 2, "seed": 0}, [ev])
    assert accuracy_rows(s, tmp_path)[0]["ior"] is None  # nothing cached
    refs = cache_root(tmp_path) / "references"
    write_json_atomic(refs / "random-real-fp1-dc-convnet-3-r28" / "k1" / "result.json",
                      {"mean": 55.0, "ipc": 2, "protocol": protocol})
    write_json_atomic(refs / "random-real-fp1-dc-convnet-3-r28" / "k2" / "result.json",
                      {"mean": 70.0, "ipc": 10, "protocol": protocol})  # another IPC: not this set's
    write_json_atomic(refs / "full-fp1-dc-convnet-3-r28" / "k3" / "result.json",
                      {"mean": 90.0, "protocol": {**protocol, "epochs": 6}})  # full: any epochs
    (row,) = accuracy_rows(s, tmp_path)
    assert (row["random_real"], row["ior"], row["full"], row["hlr"]) == (55.0, 5.0, 90.0, 30.0)
    assert row["lrs"] is not None
    s.evals = [{**ev, "data": {"train_fingerprint": "other"}}]  # other data: no reference
    assert accuracy_rows(s, tmp_path)[0]["ior"] is None


def test_the_shipped_full_data_reference_fills_hlr_until_one_is_cached(tmp_path):
    """Fashion-MNIST's full-data reference ships with mgd3 (docs/METHODS.md §6.1): with an empty cache
    a dc evaluation of that data gets HLR and LRS from it, named as shipped (the report marks it †);
    other data, another protocol or the random-real kind get nothing; a cached reference wins."""
    from mgd3.evaluation.references import SHIPPED_REFERENCES, cache_root, find_cached, write_json_atomic
    from mgd3.report.document import Doc, _accuracy_section

    (rec,) = json.loads(SHIPPED_REFERENCES.read_text())["full"]
    fp, protocol = rec["data"]["train_fingerprint"], {**rec["protocol"], "epochs": 300}
    assert rec["data"]["name"] == "fashion-mnist" and len(rec["set"]["class_ids"]) == 10
    assert rec["seeds"] == [0] and rec["mean"] == rec["runs"][0]["final_acc"] and rec["command"].startswith("mgd3 ")
    d = find_cached("full", fp, protocol, ipc=None, cache_dir=tmp_path)
    assert d["mean"] == rec["mean"] and d["cache_file"] is None and d["source"].startswith("shipped with mgd3 (mgd3 ")
    assert find_cached("full", "0" * 16, protocol, ipc=None, cache_dir=tmp_path) is None
    assert find_cached("full", fp, {**protocol, "augment": "dsa"}, ipc=None, cache_dir=tmp_path) is None
    assert find_cached("random-real", fp, protocol, ipc=10, cache_dir=tmp_path) is None
    ev = {**_eval(80.0), "protocol": protocol, "data": {"train_fingerprint": fp}}
    s = SetInfo(Path("x"), "x", {"method": "mgd3", "ipc": 10, "seed": 0}, [ev])
    (row,) = accuracy_rows(s, tmp_path)
    assert row["full"] == round(rec["mean"], 2) and row["hlr"] == round(rec["mean"] - 80.0, 2)
    assert row["full_source"] == d["source"]
    entry = {"label": "x", "method": "mgd3", "ipc": 10, "seed": 0, "accuracy": [{**row, "ars": None}]}
    doc = Doc()
    _accuracy_section(doc, [entry])
    assert f"{rec['mean']:.2f} †" in doc.markdown() and f"† full-data reference {d['source']}." in doc.markdown()
    write_json_atomic(cache_root(tmp_path) / "references" / f"full-{fp}-dc-convnet-3-r28" / "k" / "result.json",
                      {"mean": 93.0, "protocol": {**protocol, "epochs": 20}})
    (row,) = accuracy_rows(s, tmp_path)
    assert row["full"] == 93.0 and not row["full_source"].startswith("shipped")


def test_ars_pairs_the_dc_and_dc_dsa_evaluations():
    """DD-Ranking's ARS: b = 0.5 IOR with augmentation (dc-dsa) + 0.5 IOR without (dc), fractions."""
    import math

    dsa = _eval(70.0, rr=62.0, full=85.0)
    dsa["protocol"] = {"name": "dc-dsa", "epochs": 1000}
    s = SetInfo(Path("x"), "x", {"method": "mgd3", "ipc": 2, "seed": 0}, [_eval(60.0, rr=50.0, full=80.0), dsa])
    rows = accuracy_rows(s)
    b = 0.5 * 0.08 + 0.5 * 0.10
    want = round((math.exp(b) - math.exp(-1)) / (math.e - math.exp(-1)), 4)
    assert [r["ars"] for r in rows] == [want, want] == [0.309, 0.309]


# --------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def two_sets(digits_model, tmp_path_factory):
    """An mgd3 set and a random-real set (2 classes × IPC 2) distilled through the real CLI."""
    root = tmp_path_factory.mktemp("report-sets")
    env = {"MGD3_CACHE_DIR": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    sets = {}
    for method in ("mgd3", "random-real"):
        out = root / method
        run_cli("distill", "--data", "digits", "--model", digits_model, "--classes", "3", "8", "--ipc", "2",
                "--steps", "3", "--method", method, "--out", out, "--quiet", env=env, check=True)
        sets[method] = out
    return root, env, sets


def test_cli_report_end_to_end(two_sets, tmp_path):
    root, env, sets = two_sets
    (sets["mgd3"] / "eval.json").write_text(json.dumps(_eval(60.0, rr=50.0, full=80.0)))
    # the random-real set once more without latents.pt: its PNGs are encoded by the VAE instead
    bare = tmp_path / "bare" / "random-real"
    shutil.copytree(sets["random-real"], bare)
    (bare / "latents.pt").unlink()
    out = tmp_path / "rep"
    r = run_cli("report", sets["mgd3"], sets["random-real"], bare, "--out", out, "--plot-real-per-class", "30",
                "--threads", "1", "--quiet", "--no-evaluate", env=env)
    assert r.returncode == 0, r.stderr
    assert "report of 3 set(s) (1 evaluated" in r.stdout and str(out) in r.stdout

    rep = json.loads((out / "report.json").read_text())
    labels = [e["label"] for e in rep["sets"]]
    assert labels == ["mgd3", "random-real", "random-real-2"]
    e_mgd3, e_rr, e_bare = rep["sets"]
    (acc,) = e_mgd3["accuracy"]
    assert (acc["mean"], acc["ior"], acc["recovery"], acc["hlr"]) == (60.0, 10.0, 0.75, 20.0)
    assert e_rr["accuracy"] == [] and e_rr["timing_s"]["total"] > 0
    for e in rep["sets"]:
        m = e["metrics"]
        assert set(m["per_class"]) == {"3", "8"} and m["modes"] == 4 and 1 <= m["covered"] <= 4
        assert m["coverage"] == pytest.approx(np.mean([c["covered"] / 2 for c in m["per_class"].values()]))
        assert 0 <= m["diversity"] <= 2 and -1 <= m["representativeness"] <= 1
        assert e["embedding"] == "tsne"
        for f in e["figures"].values():
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-encoding the saved 8-bit PNGs gives nearly the latents.pt of the same images
    for c in ("3", "8"):
        a, b = e_rr["metrics"]["per_class"][c], e_bare["metrics"]["per_class"][c]
        assert b["diversity"] == pytest.approx(a["diversity"], abs=0.05)
        assert b["representativeness"] == pytest.approx(a["representativeness"], abs=0.05)
    assert rep["definitions"]["k_neighbors"] == 50 and "VAE latents" in rep["definitions"]["feature_space"]
    assert (out / "diversity_representativeness.png").is_file()

    md = (out / "report.md").read_text()
    for text in ("## 1. Accuracy", "60.00 ± 0.50", "+10.00", "75.0 %", "not evaluated", "## 5. Mode coverage",
                 "representativeness", "diversity", "![", "distill generate", "dc/convnet3: 9.0"):
        assert text in md, text
    # grids read from the sets' images: one row per class named on the left, cells of at least 64 px;
    # three sets side by side in one figure under their labels
    from PIL import Image

    with Image.open(out / e_mgd3["figures"]["grid"]) as g, Image.open(out / rep["figures"]["comparison"]) as c:
        cell = (g.size[1] - 2) // 2 - 2  # two classes
        assert cell >= 64 and g.size[0] > 2 * (cell + 2) + 2  # two images per class and a label column
        assert c.size[0] > 3 * 2 * (cell + 2) and c.size[1] > g.size[1]  # three blocks, a title line
    assert "side by side" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 + 3 + 1 + 1 and "not evaluated" in html
    assert "src='grid" not in html  # self-contained: no file references


def test_report_trains_the_random_real_reference_an_evaluation_lacks(two_sets, tmp_path):
    root, env, sets = two_sets
    s = tmp_path / "evaluated"
    shutil.copytree(sets["mgd3"], s)
    (s / "eval.json").unlink(missing_ok=True)
    r = run_cli("evaluate", s, "--seeds", "0", "--epochs", "1", "--device", "cpu", "--quiet", "--no-reference",
                "--threads", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "references" not in json.loads((s / "eval.json").read_text())
    out = tmp_path / "rep"
    args = ("report", s, "--out", out, "--embedding", "pca", "--threads", "1", "--quiet")
    r = run_cli(*args, "--no-reference", env=env)
    assert r.returncode == 0, r.stderr
    (acc,) = json.loads((out / "report.json").read_text())["sets"][0]["accuracy"]
    assert acc["random_real"] is None and acc["ior"] is None
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert "no random-real reference for its dc evaluation at IPC 2 is cached: training it now" in r.stderr
    (acc,) = json.loads((out / "report.json").read_text())["sets"][0]["accuracy"]
    assert acc["random_real"] is not None and acc["ior"] == pytest.approx(acc["mean"] - acc["random_real"], abs=0.02)
    r = run_cli(*args, env=env)  # cached now
    assert "training it now" not in r.stderr


def test_report_evaluates_a_set_never_evaluated(two_sets, tmp_path):
    """No other command first: the report runs `mgd3 evaluate DIR` with its defaults (dc, 300 epochs,
    seeds 0 1 2) and the random-real reference; the accuracy row is that eval.json's."""
    root, env, sets = two_sets
    s = tmp_path / "fresh"
    shutil.copytree(sets["mgd3"], s)
    (s / "eval.json").unlink(missing_ok=True)
    shutil.rmtree(s / "evals", ignore_errors=True)
    out = tmp_path / "rep"
    args = ("report", s, "--out", out, "--embedding", "pca", "--threads", "1", "--quiet")
    r = run_cli(*args, "--no-evaluate", env=env)
    assert r.returncode == 0, r.stderr
    assert not (s / "eval.json").exists() and "has no evaluation" not in r.stderr
    assert "not evaluated" in (out / "report.md").read_text()
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert f"has no evaluation: running `mgd3 evaluate {s}` now (dc protocol, seeds 0 1 2" in r.stderr
    ev = json.loads((s / "eval.json").read_text())
    assert ev["seeds"] == [0, 1, 2] and ev["protocol"]["name"] == "dc" and ev["protocol"]["epochs"] == 300
    assert ev["references"]["random_real"]["ipc"] == 2
    (acc,) = json.loads((out / "report.json").read_text())["sets"][0]["accuracy"]
    assert acc["mean"] == round(ev["mean"], 2) and acc["random_real"] == round(ev["references"]["random_real"]["mean"], 2)
    assert acc["ior"] == pytest.approx(acc["mean"] - acc["random_real"], abs=0.02)
    assert "not evaluated" not in (out / "report.md").read_text()
    r = run_cli(*args, env=env)  # evaluated now: read, not trained again
    assert r.returncode == 0, r.stderr
    assert "has no evaluation" not in r.stderr and "training it now" not in r.stderr


def test_bad_input_is_one_line(two_sets, tmp_path, capsys):
    _, _, sets = two_sets
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mgd3: error: ") and "no manifest.json" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "fmnist"
    shutil.copytree(sets["mgd3"], other)  # a whole set (a manifest without its images is refused earlier)
    m = json.loads((sets["mgd3"] / "manifest.json").read_text())
    m["data"]["name"] = "fashion-mnist"
    (other / "manifest.json").write_text(json.dumps(m))
    assert main(["report", str(sets["mgd3"]), str(other), "--out", str(tmp_path / "r")]) == 2
    assert "different datasets" in capsys.readouterr().err
    assert main(["report", str(sets["mgd3"]), str(sets["mgd3"]), "--out", str(tmp_path / "r")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written on bad input
    bad_eval = tmp_path / "bad-eval"
    shutil.copytree(sets["random-real"], bad_eval)
    (bad_eval / "eval.json").write_text("{not json")
    with pytest.raises(Mgd3Error, match="not valid JSON"):
        report(ReportConfig(sets=[str(bad_eval)], out=str(tmp_path / "r2"), progress=False))
    with pytest.raises(Mgd3Error, match="--neighbors"):
        report(ReportConfig(sets=[str(sets["mgd3"])], out=str(tmp_path / "r2"), neighbors=0, progress=False))
