"""The run's bookkeeping as pure code, without a model: planning and resuming batches, assembling
a set, the run key, the split of classes over ranks, a model's per-IPC recommendations, and
refusals that need no model returning before any model loads."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mgd3.backends.base import Backend
from mgd3.backends.recommended import check_recommended
from mgd3.errors import Mgd3Error
from mgd3.io import store
from mgd3.methods import ClassInfo, Item, SamplerConfig, item_seed
from mgd3.run import bookkeeping as bk
from mgd3.run.ranks import classes_of_rank
from mgd3.run.settings import DistillConfig
from mgd3.run.spec import RunSpec, resolve_run

A, B = ClassInfo(0, "a", "A", 3), ClassInfo(1, "b", "B", 5)


def _items(c: ClassInfo, ks, seed=0) -> list[Item]:
    return [Item(c, k, item_seed(seed, c.class_id, k)) for k in ks]


def test_a_new_run_is_batched_per_class_in_runs_of_batch_size(tmp_path):
    work = bk.batches_to_generate([A, B], ipc=5, seed=0, batch_size=2, out=tmp_path, resume=False,
                                  order_dependent=False)
    assert all(w.shard is None for w in work)
    assert [[(it.cls.index, it.index) for it in w.items] for w in work] == [
        [(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4)], [(1, 0), (1, 1)], [(1, 2), (1, 3)], [(1, 4)]]
    assert work[0].items[1].seed == item_seed(0, "a", 1)


def _finish(out, items: list[Item]) -> None:
    """What the driver leaves for a finished batch: its PNGs, then its shard."""
    images = torch.zeros(len(items), 1, 4, 4)
    folders = [store.class_folder(it.cls.index, it.cls.class_id, 2) for it in items]
    paths = store.write_images(out, folders, [it.index for it in items], images)
    shard = bk.make_shard(items, paths, torch.zeros(len(items), 2, 2, 2), store.to_pixels(images), None, None)
    store.save_shard(out, items[0].cls.index, items[0].index, shard)


def test_a_resumed_run_keeps_finished_batches_and_rebuilds_the_original_ones(tmp_path):
    _finish(tmp_path, _items(A, [0, 1]))  # batch 1 of class a done; batch 2 lost; batch 3 done
    _finish(tmp_path, _items(A, [4]))
    work = bk.batches_to_generate([A, B], ipc=5, seed=0, batch_size=2, out=tmp_path, resume=True,
                                  order_dependent=False)
    kept = [w.shard["indices"] for w in work if w.shard is not None]
    todo = [[(it.cls.index, it.index) for it in w.items] for w in work if w.items is not None]
    assert kept == [[0, 1], [4]]
    assert todo == [[(0, 2), (0, 3)], [(1, 0), (1, 1)], [(1, 2), (1, 3)], [(1, 4)]]
    # an order-dependent method makes everything after the first missing image again
    work = bk.batches_to_generate([A], ipc=5, seed=0, batch_size=2, out=tmp_path, resume=True,
                                  order_dependent=True)
    assert [w.shard["indices"] for w in work if w.shard is not None] == [[0, 1]]
    assert [[it.index for it in w.items] for w in work if w.items is not None] == [[2, 3], [4]]


def test_a_shard_whose_image_is_gone_is_generated_again(tmp_path):
    _finish(tmp_path, _items(A, [0, 1]))
    (tmp_path / "images" / store.class_folder(0, "a", 2) / "1.png").unlink()
    work = bk.batches_to_generate([A], ipc=2, seed=0, batch_size=2, out=tmp_path, resume=True,
                                  order_dependent=False)
    assert [w.shard for w in work] == [None] and [it.index for it in work[0].items] == [0, 1]


def test_assemble_orders_the_set_by_class_whatever_order_shards_came_in(tmp_path):
    outputs: dict[int, bk.ClassOutput] = {}
    for c, ks in ((B, [0]), (A, [1]), (A, [0])):  # as processes and resumes deliver them
        items = _items(c, ks)
        u8 = np.full((len(ks), 4, 4), 10 * c.index + ks[0], dtype=np.uint8)
        shard = bk.make_shard(items, [f"p{c.index}{k}" for k in ks], torch.full((len(ks), 1), float(c.index)), u8,
                              [7] * len(ks), None)
        outputs.setdefault(c.index, bk.ClassOutput()).add(shard)
    got = bk.assemble([A, B], outputs)
    assert [r["path"] for r in got.records] == ["p01", "p00", "p10"]  # class order; within a class, as added
    assert got.latents.flatten().tolist() == [0.0, 0.0, 1.0]
    assert [row.shape[0] for row in got.grid_rows] == [2, 1]
    assert [int(row[0, 0, 0]) for row in got.grid_rows] == [0, 10]  # grid rows by image index


def _key(**over):
    cfg = DistillConfig(**{"data": "d", "out": "o", **{k: v for k, v in over.items() if k != "options"}})
    backend = SimpleNamespace(name="dit", path=".", latent_shape=(4, 2, 2))
    data = SimpleNamespace(resolution=8, channels=1)
    spec = RunSpec(cfg, over.get("options"), (A,), None, None, data_fingerprint="f", model_fingerprint="m")
    return bk.run_key(spec, backend, data, order_dependent=False)


def test_the_run_key_holds_what_changes_an_image_and_nothing_else():
    base = _key()
    assert _key(batch_size=7) == base and _key(out="elsewhere") == base and _key(device="cpu") == base
    assert _key(seed=1) != base and _key(ipc=3) != base
    assert _key(sampler=SamplerConfig(steps=10)) != base
    # settings added later enter the key only when set: a folder started before them still resumes
    assert "select_from" not in base and _key(select_from=4)["select_from"] == 4
    Opt = dataclasses.make_dataclass("Opt", [("lam", float)])
    assert _key(options=Opt(0.1)) != _key(options=Opt(0.3))


@pytest.mark.parametrize("world, rank, classes", [(1, 0, [0, 1, 2, 3, 4]), (2, 0, [0, 2, 4]), (2, 1, [1, 3]),
                                                  (3, 2, [2]), (8, 6, [])])
def test_ranks_share_classes_round_robin(world, rank, classes):
    all_classes = [ClassInfo(i, f"c{i}", f"C{i}", i) for i in range(5)]
    assert [c.index for c in classes_of_rank(all_classes, world, rank)] == classes
    shares = [c.index for r in range(world) for c in classes_of_rank(all_classes, world, r)]
    assert sorted(shares) == list(range(5))  # every class once


def _backend(defaults: dict) -> Backend:
    return Backend(name="dit", path=".", latent_shape=(4, 2, 2), image_channels=1, resolution=8, num_classes=2,
                   learned_sigma=False, betas=np.linspace(1e-4, 0.02, 10), defaults=defaults)


def test_recommendations_by_ipc_merge_over_the_folder_wide_ones():
    d = check_recommended({"cfg": 1.5, "methods": {"mgd3": {"lambda": 0.1, "t_stop": 5}},
                           "by_ipc": [{"ipc": [5, 20], "methods": {"mgd3": {"lambda": 0.3, "cfg": 2.5}}},
                                      {"ipc": [21, 100], "steps": 100}]}, "test")
    b = _backend(d)
    settings, rng = b.defaults_at(10, "mgd3")
    assert rng == [5, 20] and settings["cfg"] == 2.5 and settings["methods"]["mgd3"] == {
        "lambda": 0.3, "t_stop": 5, "cfg": 2.5}
    assert b.defaults_at(10, "plain").settings["cfg"] == 1.5  # a method's own CFG is its own
    assert b.defaults_at(50).settings["steps"] == 100 and b.defaults_at(50).ipc_range == [21, 100]
    assert b.defaults_at(1) == ({"cfg": 1.5, "methods": {"mgd3": {"lambda": 0.1, "t_stop": 5}}}, None)


@pytest.mark.parametrize("defaults, message", [
    ({"by_ipc": [{"ipc": [1, 10]}, {"ipc": [10, 20]}]}, "overlap"),
    ({"by_ipc": [{"ipc": [5, 1]}]}, "1 <= low <= high"),
    ({"cfg": float("nan")}, "finite"),
    ({"steps": 0}, "at least 1"),
    ({"methods": {"mgd3": 3}}, "must be a mapping"),
    ({"by_ipc": [{"ipc": [1, 2], "by_ipc": []}]}, "cannot hold another"),
])
def test_bad_recommendations_are_one_line_errors(defaults, message):
    with pytest.raises(Mgd3Error, match=message):
        check_recommended(defaults, "mgd3.json")


def test_a_conflict_that_needs_no_model_is_refused_before_any_model_loads(tmp_path):
    from mgd3.run.driver import distill

    cfg = DistillConfig(data="fashion-mnist", out=str(tmp_path / "o"), model=str(tmp_path / "no-such-model"),
                        options={"t_stop": 3, "t_stop_timestep": 500})
    t = time.perf_counter()
    with pytest.raises(Mgd3Error, match="mutually exclusive"):  # not "no-such-model does not exist"
        distill(cfg)
    assert time.perf_counter() - t < 5 and not (tmp_path / "o").exists()


# --- the run resolved once (mgd3.run.spec)


class _Counting(Backend):
    calls = 0

    def defaults_at(self, ipc, method=None):
        type(self).calls += 1
        return super().defaults_at(ipc, method)


def _spec(tmp_path, method="mgd3", recommend=None, **over):
    from mgd3.methods import get_method

    _Counting.calls = 0
    b = _Counting(name="dit", path=tmp_path, latent_shape=(4, 2, 2), image_channels=1, resolution=8, num_classes=2,
                  learned_sigma=False, betas=np.linspace(1e-4, 0.02, 10),
                  defaults=check_recommended(recommend or {}, "test"))
    data = SimpleNamespace(class_ids=["a", "b"], class_names=["A", "B"], fingerprint=lambda: "f")
    cfg = DistillConfig(data="d", out="o", method=method, ipc=10, **over)
    return resolve_run(cfg, b, data, [1, 0], get_method(method))


def test_a_run_is_resolved_from_one_reading_of_the_recommendations(tmp_path):
    rec = {"cfg": 1.5, "by_ipc": [{"ipc": [5, 20], "steps": 30, "cfg_interval": [0.4, 1.2],
                                   "methods": {"mgd3": {"lambda": 0.3, "cfg": 2.5}}}]}
    spec = _spec(tmp_path, recommend=rec)
    assert _Counting.calls == 1
    assert (spec.sampler.steps, spec.sampler.cfg, spec.sampler.cfg_interval) == (30, 2.5, (0.4, 1.2))
    assert spec.options.lam == 0.3 and spec.options.t_stop == 15  # the stop index from the resolved steps
    assert spec.recommended.ipc_range == [5, 20]
    assert spec.recommended.taken == {"--lambda": 0.3, "--cfg": 2.5, "--steps": 30, "--cfg-interval": (0.4, 1.2)}
    assert [(c.class_id, c.label) for c in spec.classes] == [("a", 1), ("b", 0)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.options = None


def test_what_the_user_gives_wins_over_the_recommendations(tmp_path):
    rec = {"cfg": 1.5, "steps": 30, "methods": {"mgd3": {"lambda": 0.3}}}
    spec = _spec(tmp_path, recommend=rec, sampler=SamplerConfig(steps=8, cfg=3.0), options={"lambda": 0.2})
    assert (spec.sampler.steps, spec.sampler.cfg, spec.options.lam, spec.options.t_stop) == (8, 3.0, 0.2, 4)
    assert spec.recommended is None  # nothing was taken
    plain = _spec(tmp_path, method="plain")
    assert (plain.sampler.steps, plain.sampler.cfg, plain.sampler.cfg_interval) == (50, 4.0, None)  # the defaults


def test_a_method_that_does_not_sample_takes_no_steps_from_the_model(tmp_path):
    spec = _spec(tmp_path, method="random-real", recommend={"steps": 100, "cfg_interval": [0.4, 1.2]})
    assert spec.sampler.steps == 50 and spec.sampler.cfg_interval is None and spec.recommended is None
