"""Every registered method through the real CLI on the tiny model, plus exact checks per method."""

import json

import numpy as np
import pytest
import torch

from inprocess import run_main
from mgd3.run.driver import DistillConfig, distill
from mgd3.methods import SamplerConfig, load_methods
from mgd3.methods.dmgd import semantic_lambda, sinkhorn
from mgd3.core.mode_discovery import MODE_FINDERS, find_modes

METHODS = load_methods().names()


def _cfg(model, out, **kw):
    return DistillConfig(data="digits", out=str(out), model=str(model), progress=False,
                         sampler=kw.pop("sampler", SamplerConfig(steps=6)), **kw)


def _latents(out):
    return torch.load(out / "latents.pt", weights_only=True)["latents"]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_a_complete_set(digits_model, tmp_path, method, sampler, capsys):
    out = tmp_path / method
    extra = ["--iterations", "2"] if method == "dm" else []  # DM's default is 20 000 optimisation steps
    if method.startswith("igd"):  # IGD's surrogate: 2 epochs, not the released 50
        extra = ["--surrogate-epochs", "2", "--igd-low", "0"]
    r = run_main(capsys, "distill", "--data", "digits", "--model", digits_model, "--method", method, "--ipc", "2",
                 "--classes", "0", "1", "2", "--out", out, "--steps", "6", "--sampler", sampler, "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == method and len(m["images"]) == 6
    assert all((out / rec["path"]).is_file() for rec in m["images"])
    assert _latents(out).shape == (6, 4, 4, 4)


def test_kmeans_real_returns_the_real_images_nearest_the_centroids(digits_model, tmp_path):
    from mgd3.backends import load_backend
    from mgd3.io.data import load_data
    from mgd3.core.encode import encode_classes

    distill(_cfg(digits_model, tmp_path / "s", method="kmeans-real", ipc=3, classes=["6"]))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    data = load_data("digits", resolution=8, channels=1, classes=["6"])
    lat = encode_classes(load_backend(digits_model), data, [0], progress=False)[0]
    nearest = find_modes("kmeans", lat.numpy(), 3).nearest_real
    assert [r["real_index"] for r in m["images"]] == [int(i) for i in data.indices(0)[nearest]]
    from PIL import Image
    ds = data.dataset()
    for rec in m["images"]:
        real = ((ds[rec["real_index"]][0][0] + 1) * 127.5).round().numpy().astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / rec["path"])), real)


def test_random_real_is_seeded_and_real(digits_model, tmp_path):
    a = distill(_cfg(digits_model, tmp_path / "a", method="random-real", ipc=4, classes=["3"], seed=1))
    distill(_cfg(digits_model, tmp_path / "b", method="random-real", ipc=4, classes=["3"], seed=1))
    distill(_cfg(digits_model, tmp_path / "c", method="random-real", ipc=4, classes=["3"], seed=2))
    idx = {n: [r["real_index"] for r in json.loads((tmp_path / n / "manifest.json").read_text())["images"]]
           for n in "abc"}
    assert idx["a"] == idx["b"] != idx["c"] and len(set(idx["a"])) == 4 and a["images"] == 4


def test_d4m_strength_zero_returns_the_decoded_prototypes(digits_model, tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    from mgd3.backends import load_backend
    from mgd3.io.data import load_data
    from mgd3.core.encode import encode_classes

    distill(_cfg(digits_model, tmp_path / "s", method="d4m", ipc=2, classes=["5"], options={"strength": 0.0}))
    data = load_data("digits", resolution=8, channels=1, classes=["5"])
    lat = encode_classes(load_backend(digits_model), data, [0], progress=False)[0]
    km = MiniBatchKMeans(n_clusters=2, random_state=0, n_init="auto").fit(lat.flatten(1).numpy())
    torch.testing.assert_close(_latents(tmp_path / "s"), torch.from_numpy(km.cluster_centers_).view(2, 4, 4, 4).float())


def test_d4m_strength_one_is_plain_sampling(digits_model, tmp_path):
    distill(_cfg(digits_model, tmp_path / "d", method="d4m", ipc=2, classes=["5"], options={"strength": 1.0}))
    distill(_cfg(digits_model, tmp_path / "p", method="plain", ipc=2, classes=["5"]))
    # full strength starts from x_T = sqrt(ᾱ_T)·prototype + sqrt(1-ᾱ_T)·noise, nearly pure noise
    assert torch.allclose(_latents(tmp_path / "d"), _latents(tmp_path / "p"), rtol=0.01, atol=0.5)


def test_dmgd_with_rho_zero_and_no_semantic_equals_plain(digits_model, tmp_path):
    kw = dict(ipc=2, classes=["1", "2"])
    distill(_cfg(digits_model, tmp_path / "p", method="plain", **kw))
    distill(_cfg(digits_model, tmp_path / "d", method="dmgd", options={"distribution": True, "rho": 0.0,
                                                                       "dm_start": 5, "dm_stop": 0}, **kw))
    assert torch.equal(_latents(tmp_path / "p"), _latents(tmp_path / "d"))
    distill(_cfg(digits_model, tmp_path / "s", method="dmgd", options={"semantic": True}, **kw))
    distill(_cfg(digits_model, tmp_path / "o", method="dmgd", options={"distribution": True, "rho": 5.0,
                                                                       "dm_start": 5, "dm_stop": 1}, **kw))
    assert not torch.allclose(_latents(tmp_path / "p"), _latents(tmp_path / "s"))
    assert not torch.allclose(_latents(tmp_path / "p"), _latents(tmp_path / "o"))


def test_sinkhorn_marginals_match_the_masses():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(7, 4, generator=g, dtype=torch.float64)
    a = torch.full((7,), 1 / 7, dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    p5 = sinkhorn(cost, a, b, iters=5, eps=0.1)
    torch.testing.assert_close(p5.sum(0), b)  # the last half-step fits the target masses exactly
    p = sinkhorn(cost, a, b, iters=500, eps=0.1)
    torch.testing.assert_close(p.sum(1), a)
    torch.testing.assert_close(p.sum(0), b)


def test_semantic_lambda_schedule():
    assert semantic_lambda(999) == 0 and semantic_lambda(901) == 0
    assert semantic_lambda(900) == 0 and semantic_lambda(700) == pytest.approx(0.5)
    assert semantic_lambda(500) == 1 and semantic_lambda(0) == 1


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # well-separated toy clusters
@pytest.mark.parametrize("finder", MODE_FINDERS.names())
def test_every_mode_finder_gives_k_modes(finder):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, size=(40, 6)) for c in (-2, 0, 2)]).astype(np.float32)
    m = find_modes(finder, x, 5, seed=0)
    assert m.points.shape == (5, 6) and len(m.nearest_real) == 5 and len(m.assignment) == 120
    again = find_modes(finder, x, 5, seed=0)
    assert np.array_equal(m.points, again.points)


def test_mgd3_modes_option_through_cli_records_finder(digits_model, tmp_path, capsys):
    out = tmp_path / "s"
    r = run_main(capsys, "distill", "--data", "digits", "--model", digits_model, "--modes", "dbscan", "--ipc", "3",
                "--classes", "7", "--out", out, "--steps", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["method_info"]["mode_discovery"]["finder"] == "dbscan"


def test_max_real_per_class_uses_a_fixed_subset(digits_model, tmp_path):
    kw = dict(ipc=2, classes=["3"], max_real_per_class=20)
    distill(_cfg(digits_model, tmp_path / "a", method="kmeans-real", **kw))
    distill(_cfg(digits_model, tmp_path / "b", method="kmeans-real", **kw))
    ia, ib = ([r["real_index"] for r in json.loads((tmp_path / n / "manifest.json").read_text())["images"]]
              for n in "ab")
    assert ia == ib
    cache = list((tmp_path / "mgd3-cache" / "latents").rglob("3-*.pt"))
    assert len(cache) == 1 and torch.load(cache[0], weights_only=True).shape[0] == 20
    with pytest.raises(Exception, match="at least --ipc"):
        distill(_cfg(digits_model, tmp_path / "c", method="mgd3", ipc=5, classes=["3"], max_real_per_class=4))
