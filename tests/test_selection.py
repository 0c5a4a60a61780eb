"""Subset selection over generated candidates (`--select-from G`, mgd3.run.selection)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inprocess import run_main
from mgd3.run.driver import DistillConfig, distill
from mgd3.errors import Mgd3Error
from mgd3.methods import SamplerConfig, item_seed
from mgd3.run.selection import candidate_seed, greedy_subgroup


# --------------------------------------------------------------------------- the greedy rule


def test_first_pick_is_the_candidate_nearest_its_centroid_without_other_classes():
    cands = np.array([[3.0, 0.0], [0.2, 0.1], [-1.0, 1.0]])
    assert greedy_subgroup(cands, np.zeros(2), np.zeros((0, 2)), 1) == [1]


def test_the_subgroup_mean_decides_later_picks():
    """c is nearest alone; then b, whose mean with c is nearer the centroid than a's."""
    a, b, c = [1.0, 0.0], [-1.0, 0.0], [0.5, 0.5]
    assert greedy_subgroup(np.array([a, b, c]), np.zeros(2), np.zeros((0, 2)), 2) == [2, 1]
    # by hand: |mean(c, a)| = |(0.75, 0.25)| = 0.79 > |mean(c, b)| = |(-0.25, 0.25)| = 0.35


def test_distance_to_the_nearest_other_class_counts():
    """Two candidates equally near the own centroid: the one farther from the other class wins."""
    own, other = np.array([0.0, 0.0]), np.array([[4.0, 0.0], [0.0, 40.0]])
    cands = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert greedy_subgroup(cands, own, other, 1) == [1]
    # with only (0, 40) as the other class both candidates score the same: the lower one wins
    assert greedy_subgroup(cands, own, other[1:], 1) == [0]


def test_every_candidate_at_most_once_and_all_when_k_is_n():
    rng = np.random.default_rng(0)
    cands = rng.normal(size=(12, 5))
    picked = greedy_subgroup(cands, np.zeros(5), rng.normal(size=(3, 5)), 12)
    assert sorted(picked) == list(range(12))
    with pytest.raises(Mgd3Error, match="cannot keep 13 of 12"):
        greedy_subgroup(cands, np.zeros(5), np.zeros((0, 5)), 13)


def test_candidate_seeds_are_stable_and_distinct():
    seeds = {candidate_seed(0, "3", k, j) for k in range(4) for j in range(5)}
    assert len(seeds) == 20 and item_seed(0, "3", 0) not in seeds
    assert candidate_seed(0, "3", 1, 2) == candidate_seed(0, "3", 1, 2) != candidate_seed(1, "3", 1, 2)


# --------------------------------------------------------------------------- through the driver


def _cfg(model, out, **kw):
    return DistillConfig(data="digits", out=str(out), model=str(model), progress=False, classes=["0", "1", "2"],
                         ipc=2, sampler=SamplerConfig(steps=4), **kw)


def _latents(out):
    return torch.load(out / "latents.pt", weights_only=True)["latents"]


def test_select_from_1_is_no_selection_bit_for_bit(digits_model, tmp_path):
    distill(_cfg(digits_model, tmp_path / "a", method="mgd3"))
    distill(_cfg(digits_model, tmp_path / "b", method="mgd3", select_from=1))
    assert torch.equal(_latents(tmp_path / "a"), _latents(tmp_path / "b"))
    for p in sorted((tmp_path / "a" / "images").rglob("*.png")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()


def test_selected_images_are_candidates_the_greedy_rule_keeps(digits_model, tmp_path):
    """With G = 3, each kept image is its candidate regenerated alone (same generator, same mode),
    and the kept set is what `greedy_subgroup` picks among all candidates of the class."""
    from mgd3.backends import load_backend
    from mgd3.methods import ClassInfo, Context, Item, get_method

    out = tmp_path / "s"
    distill(_cfg(digits_model, out, method="mgd3", select_from=3, batch_size=4))
    m = json.loads((out / "manifest.json").read_text())
    lat = _latents(out)
    recs = m["images"]
    assert all(r["selected_from"]["candidates"] == 3 for r in recs)
    assert m["config"]["select_from"] == 3

    # regenerate every candidate of class "1" directly and apply the rule
    backend = load_backend(digits_model)
    from mgd3.io.data import load_data

    data = load_data("digits", resolution=backend.resolution, channels=1, classes=["0", "1", "2"])
    classes = [ClassInfo(i, cid, data.class_names[i], int(cid)) for i, cid in enumerate(data.class_ids)]
    ctx = Context(backend, data, classes, 2, 0, SamplerConfig(steps=4), progress=False)
    method = get_method("mgd3")(get_method("mgd3").Options())
    method.validate(ctx)
    method.prepare(ctx)
    c = classes[1]
    pool = [Item(c, k, candidate_seed(0, c.class_id, k, j)) for k in range(2) for j in range(3)]
    # in the run's batches of --batch-size 4 (4 + 2 candidates): the same batch make-up, the same bits
    cands = torch.cat([method.generate(ctx, pool[i:i + 4]).latents for i in range(0, len(pool), 4)])
    real = ctx.real_latents()
    cen = np.stack([real[i].reshape(len(real[i]), -1).double().mean(0).numpy() for i in range(3)])
    picked = greedy_subgroup(cands.reshape(6, -1).double().numpy(), cen[1], np.delete(cen, 1, 0), 2)
    mine = [j for j, r in enumerate(recs) if r["class_index"] == 1]
    assert [recs[j]["seed"] for j in mine] == [pool[p].seed for p in picked]
    assert [recs[j]["mode_id"] for j in mine] == [pool[p].index for p in picked]
    torch.testing.assert_close(lat[mine], cands[picked], atol=0, rtol=0)


def test_select_from_0_and_non_generating_methods_are_one_line_errors(digits_model, tmp_path, capsys):
    for extra, msg in ((["--select-from", "0", "--model", tmp_path / "no-such-model"], "--select-from must be at least 1"),
                       (["--select-from", "2", "--method", "random-real"], "does not generate"),
                       (["--select-from", "2", "--method", "dmgd"], "does not compose")):
        r = run_main(capsys, "distill", "--data", "digits", "--out", tmp_path / "x", "--ipc", "1", "--quiet",
                     *([] if "--model" in extra else ["--model", digits_model]), *extra)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mgd3: error:") and msg in lines[0], r.stderr
    assert not (tmp_path / "x").exists()
