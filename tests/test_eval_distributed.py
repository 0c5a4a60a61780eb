"""`mgd3 evaluate` under torchrun (mgd3.evaluation.dist): the rules that split the work, the DDP
shard arithmetic, exact resumption from checkpoints, and real two-process gloo launches on the
CPU — seeds over processes gives the one-process eval.json bit for bit, one DDP training
matches it within the measured tolerance, failures give one error line and no eval.json.

Every launch and the in-process reference run with one torch thread (a CPU rounds the same
only with the same threads).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_distributed import finish, free_port, mgd3_frames
from test_evaluate import write_set

from mgd3.errors import Mgd3Error
from mgd3.evaluation import checkpoint as C
from mgd3.evaluation import dist as D
from mgd3.evaluation.core import EvalConfig, evaluate
from mgd3.evaluation.train import Shard

# the tolerance of a DDP training against one process (points of test accuracy; see docs/SCALE.md)
DDP_TOLERANCE = 1.0

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the plan


def test_auto_mode_rule():
    assert D.plan("auto", world=1, seeds=[0, 1, 2], batch_size=256).mode == "single"
    p = D.plan("auto", world=2, seeds=[0, 1], batch_size=8)
    assert p.mode == "seeds" and p.seeds_by_rank == [[0], [1]]
    assert D.plan("auto", world=2, seeds=[0, 1, 2], batch_size=256).mode == "ddp"  # 3 seeds over 2: uneven
    assert D.plan("auto", world=2, seeds=[0, 1, 2], batch_size=20).mode == "seeds"  # 10 images a process: too few
    assert D.plan("auto", world=8, seeds=[0, 1, 2], batch_size=200).mode == "ddp"  # 25 images a process
    assert D.plan("auto", world=4, seeds=[0], batch_size=8).mode == "ddp"  # more processes than seeds
    p = D.plan("auto", world=3, seeds=[5, 6, 7, 8, 9], batch_size=10)
    assert p.mode == "seeds" and p.seeds_by_rank == [[5, 8], [6, 9], [7]] and p.mine(1, [5, 6, 7, 8, 9]) == [1, 4]


def test_modes_that_would_idle_a_process_are_errors():
    with pytest.raises(Mgd3Error, match="at least one seed per process"):
        D.plan("seeds", world=4, seeds=[0, 1, 2], batch_size=256)
    with pytest.raises(Mgd3Error, match="at least one image of each batch per process"):
        D.plan("ddp", world=4, seeds=[0], batch_size=2)
    with pytest.raises(Mgd3Error, match="nothing to spread"):
        D.plan("auto", world=4, seeds=[0], batch_size=2)
    with pytest.raises(Mgd3Error, match="unknown --dist-mode"):
        D.plan("pipeline", world=2, seeds=[0], batch_size=2)
    assert D.plan("ddp", world=2, seeds=[0, 1], batch_size=2).mode == "ddp"  # asked for: wins over auto


@pytest.mark.parametrize("b,world", [(10, 2), (7, 3), (2, 4), (1, 2), (200, 8)])
def test_shards_cover_each_global_batch_once_with_mean_weights(b, world):
    seen, weight = [], 0.0
    for r in range(world):
        idx, w = Shard(r, world).items(b, "cpu")
        if w:
            seen += idx.tolist()
            weight += w * len(idx) / world  # DDP averages over processes
        else:  # an empty shard joins with one image at weight 0
            assert idx.tolist() == [0]
    assert sorted(seen) == list(range(b))
    assert weight == pytest.approx(1.0)  # sum of weights x items / world = the global mean


@pytest.mark.parametrize("loss", ["ce", "cutmix", "kl"])
@pytest.mark.parametrize("b,world", [(7, 2), (10, 3), (2, 3)])
def test_shard_losses_average_to_the_one_process_gradient(loss, b, world):
    """DDP averages the processes' gradients: the mean over shards of `_shard_loss`'s gradient
    is the gradient of the one-process batch loss (uneven shards and empty shards included)."""
    import torch.nn.functional as F

    from mgd3.evaluation.networks import build_network
    from mgd3.evaluation.protocols import get_protocol
    from mgd3.evaluation.train import _shard_loss

    p = get_protocol("soft" if loss == "kl" else "dc")
    net = build_network("convnet-3", 1, 4, 8, seed=0)
    teacher = build_network("convnet-3", 1, 4, 8, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 4, (b,), generator=g)
    perm_b, ratio = (torch.randperm(b, generator=g), 0.7) if loss == "cutmix" else (None, 1.0)

    def grads(fn):
        net.zero_grad()
        fn().backward()
        return [q.grad.clone() for q in net.parameters()]

    def one_process():
        out = net(x)
        if loss == "kl":
            soft = F.softmax(teacher(x) / p.temperature, dim=1)
            return F.kl_div(F.log_softmax(out / p.temperature, dim=1), soft, reduction="batchmean")
        if perm_b is not None:
            return ratio * F.cross_entropy(out, y) + (1 - ratio) * F.cross_entropy(out, y[perm_b])
        return F.cross_entropy(out, y)

    ref = grads(one_process)
    parts = [grads(lambda r=r: _shard_loss(p, net, teacher, x, y, perm_b, ratio, Shard(r, world), torch.device("cpu"),
                                           False)) for r in range(world)]
    for i, want in enumerate(ref):
        got = sum(part[i] for part in parts) / world
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # float rounding of the sums


# --------------------------------------------------------------------------- checkpoints


def _comparable(d: dict) -> dict:
    """An eval.json without what depends on time, the result file, or how the work was split."""
    d = json.loads(json.dumps(d))
    for k in ("distributed", "train_seconds", "out"):
        d.pop(k, None)
    d["environment"].pop("date")
    d["config"].pop("out")
    d["config"].pop("dist_mode")
    for r in d["runs"]:
        r.pop("train_seconds")
        r.pop("images_per_s")
    return d


@pytest.mark.parametrize("protocol", ["dc", "minimax"])
def test_a_killed_evaluation_resumes_bit_for_bit(tmp_path, monkeypatch, protocol):
    """Killed after epoch 2 of the second seed: the rerun takes seed 0's result, continues seed 1
    from its checkpoint (weights, optimizer, torch and numpy generators) and writes the
    uninterrupted eval.json. dc re-creates its optimizer mid-run; minimax draws augmentations
    and CutMix from both generators."""
    s = write_set(tmp_path / "set", ipc=2)
    cfg = dict(set_dir=str(s), protocol=protocol, arch="convnet-3", seeds=[0, 1], epochs=4, batch_size=8,
               device="cpu", progress=False, checkpoint_s=0.0)
    whole = evaluate(EvalConfig(**cfg, out=str(tmp_path / "whole.json")))

    saves, real_save = [], C.Checkpoint.save

    def killed(self, state):
        real_save(self, state)
        saves.append((self.seed, state["epoch"]))
        if self.seed == 1 and state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(C.Checkpoint, "save", killed)
    out = tmp_path / "killed.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(**cfg, out=str(out)))
    assert not out.exists()
    folder = next((tmp_path / ".killed.json.ckpt").iterdir())
    assert sorted(f.name for f in folder.iterdir()) == ["seed-0.json", "seed-1.pt"]

    monkeypatch.setattr(C.Checkpoint, "save", real_save)
    trained = []
    import mgd3.evaluation.train as T

    real_train = T.train_and_test
    monkeypatch.setattr(T, "train_and_test", lambda *a, **k: trained.append(k["seed"]) or real_train(*a, **k))
    again = evaluate(EvalConfig(**cfg, out=str(out)))
    assert trained == [1]  # seed 0 came from its result file
    assert _comparable(again) == _comparable(whole)
    assert not (tmp_path / ".killed.json.ckpt").exists()  # removed once eval.json is written


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_or_damaged_checkpoints_are_ignored(tmp_path, caplog):
    ck = C.Checkpoint(tmp_path, 3, "key-a")
    ck.save({"epoch": 2, "model": {"w": torch.ones(2)}})
    assert C.Checkpoint(tmp_path, 3, "key-a").load()["epoch"] == 2
    assert C.Checkpoint(tmp_path, 3, "key-b").load() is None  # another configuration's
    ck.path.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert ck.load() is None and "ignoring checkpoint" in caplog.text
    # a pickle that would run code is refused by weights_only=True
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(ck.path, "wb") as f:
        pickle.dump({"key": "key-a", "epoch": 2, "x": Boom()}, f)
    assert ck.load() is None
    ck.finish({"seed": 3, "final_acc": 1.0})
    assert C.Checkpoint(tmp_path, 3, "key-a").finished() == {"seed": 3, "final_acc": 1.0}
    assert C.Checkpoint(tmp_path, 3, "key-b").finished() is None and not ck.path.exists()


# --------------------------------------------------------------------------- real launches


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MGD3_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")


def torchrun(argv, cache: Path, *, nproc: int = 2, node: tuple[int, int, int] | None = None) -> subprocess.Popen:
    """`torchrun --nproc-per-node N -m mgd3 ...`; `node` = (node rank, nodes, rendezvous port):
    one node of a multi-node launch with a c10d rendezvous on 127.0.0.1."""
    if node is None:
        launch = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    else:
        rank, nodes, port = node
        launch = ["--nnodes", str(nodes), "--nproc-per-node", str(nproc), "--node-rank", str(rank),
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mgd3-test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "mgd3", *map(str, argv)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache),
                            cwd=ROOT)


SOFT = ["--protocol", "soft", "--arch", "convnet-3", "--teacher-epochs", "1", "--epochs", "6", "--batch-size", "7",
        "--seeds", "0", "1", "--threads", "1", "--device", "cpu", "--quiet"]


def _soft_reference(s: Path, tmp_path: Path) -> dict:
    """The one-process eval.json the launches are compared with (teacher cached for them)."""
    os.environ["MGD3_CACHE_DIR"] = str(tmp_path / "cache")  # conftest's monkeypatch restores it
    return evaluate(EvalConfig(set_dir=str(s), protocol="soft", arch="convnet-3", teacher_epochs=1, epochs=6,
                               batch_size=7, seeds=[0, 1], device="cpu", threads=1, progress=False,
                               out=str(tmp_path / "one.json")))


@pytest.mark.slow
def test_seeds_over_two_processes_write_the_one_process_eval_json(tmp_path):
    """Soft labels (teacher sent from rank 0), crop-flip and CutMix: every number equal."""
    s = write_set(tmp_path / "set", ipc=2)
    one = _soft_reference(s, tmp_path)
    r = finish(torchrun(["evaluate", s, *SOFT, "--dist-mode", "seeds", "--out", tmp_path / "two.json"],
                        tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" -> ") == 1, r.stdout  # rank 0 reports, once
    two = json.loads((tmp_path / "two.json").read_text())
    assert _comparable(two) == _comparable(one)
    d = two["distributed"]
    assert d["world_size"] == 2 and d["mode"] == "seeds" and d["backend"] == "gloo" and d["nodes"] == 1
    assert [x["seeds"] for x in d["ranks"]] == [[0], [1]]
    assert two["environment"]["threads"] == one["environment"]["threads"] == 1
    assert not list(tmp_path.glob(".two.json.ckpt"))


@pytest.mark.slow
def test_one_ddp_training_over_two_processes_matches_one_process(tmp_path):
    """Same global batch (7: shards of 4 and 3), seeds and augmentations; each process its shard, teacher
    soft labels on its half. Instance norm (no batch statistics), so only the order of the
    gradient sums differs: accuracies within DDP_TOLERANCE points."""
    s = write_set(tmp_path / "set", ipc=2)
    one = _soft_reference(s, tmp_path)
    r = finish(torchrun(["evaluate", s, *SOFT, "--dist-mode", "ddp", "--out", tmp_path / "ddp.json"],
                        tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["distributed"]["mode"] == "ddp" and ddp["distributed"]["world_size"] == 2
    assert [x["seeds"] for x in ddp["distributed"]["ranks"]] == [[0, 1], [0, 1]]
    for a, b in zip(one["runs"], ddp["runs"]):
        assert [e for e, _ in a["evaluations"]] == [e for e, _ in b["evaluations"]]
        np.testing.assert_allclose([acc for _, acc in b["evaluations"]], [acc for _, acc in a["evaluations"]],
                                   atol=DDP_TOLERANCE)
    assert ddp["protocol"] == one["protocol"] and ddp["teacher"] == one["teacher"]


@pytest.mark.slow
def test_failures_under_torchrun_are_one_line_and_leave_no_eval_json(tmp_path):
    s = write_set(tmp_path / "set", ipc=2)
    # every process fails when it first saves a checkpoint (its folder's parent is a file)
    (tmp_path / ".e.json.ckpt").write_text("in the way")
    r = finish(torchrun(["evaluate", s, "--protocol", "dc", "--epochs", "3", "--seeds", "0", "1", "--threads", "1",
                         "--device", "cpu", "--quiet", "--checkpoint-s", "0", "--out", tmp_path / "e.json"],
                        tmp_path / "cache"))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("mgd3: error:")]
    assert len(errors) == 1 and "cannot write the evaluation checkpoint" in errors[0], r.stderr
    assert not mgd3_frames(r.stderr), r.stderr
    assert not (tmp_path / "e.json").exists()
    # an unsupported split never runs two copies: one line, nothing trained
    r = finish(torchrun(["evaluate", s, "--protocol", "dc", "--epochs", "3", "--seeds", "0", "--dist-mode", "seeds",
                         "--device", "cpu", "--quiet", "--out", tmp_path / "f.json"], tmp_path / "cache"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("mgd3: error:")]
    assert r.returncode != 0 and errors == [
        "mgd3: error: --dist-mode seeds needs at least one seed per process: 1 seed(s) for 2 processes "
        "(give more --seeds, fewer processes, or --dist-mode ddp)"], r.stderr
    assert not (tmp_path / "f.json").exists() and not mgd3_frames(r.stderr)


# --------------------------------------------------------------------------- two nodes on this machine


def _two_nodes(argv, cache: Path) -> list[subprocess.CompletedProcess]:
    """Two torchrun launches (one process each) that meet at a c10d rendezvous on 127.0.0.1:
    what `--nnodes 2 --rdzv-endpoint HOST:PORT` does across machines."""
    port = free_port()
    procs = [torchrun(argv, cache, nproc=1, node=(i, 2, port)) for i in range(2)]
    return [finish(p) for p in procs]


@pytest.mark.slow
def test_evaluate_on_two_nodes_writes_the_one_process_eval_json(tmp_path):
    s = write_set(tmp_path / "set", ipc=2)
    args = dict(set_dir=str(s), protocol="dc", epochs=3, seeds=[0, 1], device="cpu", threads=1, progress=False,
                random_real=False)  # the set's own runs are compared; its reference has tests of its own
    one = evaluate(EvalConfig(**args, out=str(tmp_path / "one.json")))
    rs = _two_nodes(["evaluate", s, "--protocol", "dc", "--epochs", "3", "--seeds", "0", "1", "--threads", "1",
                     "--device", "cpu", "--quiet", "--no-reference", "--out", tmp_path / "two.json"],
                    tmp_path / "cache")
    for r in rs:
        assert r.returncode == 0, r.stderr
    assert sum(r.stdout.count(" -> ") for r in rs) == 1  # the node with rank 0 reports
    two = json.loads((tmp_path / "two.json").read_text())
    assert _comparable(two) == _comparable(one)
    d = two["distributed"]
    assert d["nodes"] == 2 and d["world_size"] == 2 and sorted(x["node"] for x in d["ranks"]) == [0, 1]


@pytest.mark.slow
def test_distill_on_two_nodes_writes_the_one_process_set(digits_model, tmp_path):
    from test_distributed import ARGS, comparable, files_of, start

    one, two = tmp_path / "one", tmp_path / "two"
    p1 = start(["distill", "--data", "digits", "--model", digits_model, "--out", one, *ARGS], tmp_path / "c1", None)
    rs = _two_nodes(["distill", "--data", "digits", "--model", digits_model, "--out", two, *ARGS], tmp_path / "c2")
    r1 = finish(p1)
    assert r1.returncode == 0, r1.stderr
    for r in rs:
        assert r.returncode == 0, r.stderr
    f1, f2 = files_of(one), files_of(two)
    assert sorted(f1) == sorted(f2) and len([k for k in f1 if k.startswith("images/")]) == 9
    assert all(f1[k] == f2[k] for k in f1 if k != ".mgd3-run.json")
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["machine"]["processes"] == 2 and comparable(m1) == comparable(m2)


@pytest.mark.slow
def test_a_killed_ddp_launch_resumes_bit_for_bit(tmp_path):
    """SIGTERM to torchrun mid-training (as a scheduler's preemption); the same command again
    continues from rank 0's checkpoint, sent to both processes, and writes the eval.json of an
    uninterrupted DDP launch."""
    import signal
    import time

    s = write_set(tmp_path / "set", ipc=2)
    argv = ["evaluate", s, "--protocol", "dc", "--epochs", "150", "--batch-size", "10", "--seeds", "0",
            "--threads", "1", "--device", "cpu", "--quiet", "--dist-mode", "ddp", "--checkpoint-s", "0"]
    whole = torchrun([*argv, "--out", tmp_path / "whole.json"], tmp_path / "cache")
    killed = torchrun([*argv, "--out", tmp_path / "k.json"], tmp_path / "cache")
    ckpt, deadline = tmp_path / ".k.json.ckpt", time.monotonic() + 300
    while not list(ckpt.glob("*/seed-0.pt")) and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    assert list(ckpt.glob("*/seed-0.pt")), "no checkpoint appeared"
    killed.send_signal(signal.SIGTERM)
    r = finish(killed)
    assert r.returncode != 0 and not (tmp_path / "k.json").exists()
    r = finish(torchrun([*argv, "--out", tmp_path / "k.json"], tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch" in r.stderr
    w = finish(whole)
    assert w.returncode == 0, w.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "k.json"))
    assert _comparable(a) == _comparable(b)
    assert not ckpt.exists()


@pytest.mark.parametrize("argv, msg", [
    (["--checkpoint-s", "-1"], "--checkpoint-s must be a finite number >= 0, got -1.0"),
    (["--checkpoint-s", "nan"], "--checkpoint-s must be a finite number"),
])
def test_bad_checkpoint_interval_is_one_line(tmp_path, capsys, argv, msg):
    from mgd3.cli import main

    s = write_set(tmp_path / "set", ipc=1)
    assert main(["evaluate", s, "--device", "cpu", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mgd3: error:") and msg in err[0], err


def test_a_reference_under_torchrun_is_refused_before_any_work():
    from mgd3.evaluation.core import _evaluate
    from mgd3.evaluation.dist import OneProcess

    two = OneProcess()
    two.world = 2  # what _evaluate sees of a launch of two
    with pytest.raises(Mgd3Error, match="--reference runs in one process"):
        _evaluate(EvalConfig(reference="full", data="digits", device="cpu", progress=False), two)
