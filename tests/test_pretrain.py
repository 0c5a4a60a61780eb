"""`mgd3 pretrain` on tiny budgets with real digits: save → load (the real backend) → sample →
distill; resume after an interruption; the trainer owns label dropout; bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from mgd3.errors import Mgd3Error
from mgd3.train.latent_models import build_dit
from mgd3.train.pretrain import pretrain
from mgd3.train.pretrain_settings import SIZES, PretrainConfig

# 200 digits, 8x8 -> 4x4 latents, a 2-layer DiT, 3 optimiser steps per epoch: about a second a run
TINY = dict(data="digits", size="tiny", vae_epochs=1, epochs=1, limit=200, batch_size=64, vae_width=8,
            vae_levels=2, max_steps=3, progress=False)


def _cfg(out, **kw) -> PretrainConfig:
    return PretrainConfig(out=str(out), **{**TINY, **kw})


def _weights(folder, sub="transformer"):
    return load_file(folder / sub / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, module_one_thread):
    return pretrain(_cfg(tmp_path_factory.mktemp("pretrain") / "model", cfg=1.5))


def test_folder_has_the_dit_pipeline_layout_and_a_model_card(trained):
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["id2label"] == {str(i): str(i) for i in range(10)}
    sched = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["clip_sample"] is False
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (1e-4, 0.02, "linear")
    tcfg = json.loads((trained / "transformer" / "config.json").read_text())
    assert tcfg["num_embeds_ada_norm"] == 10 and tcfg["out_channels"] == tcfg["in_channels"] == 4
    assert tcfg["norm_type"] == "ada_norm_zero" and tcfg["sample_size"] == 4
    info = json.loads((trained / "mgd3.json").read_text())
    assert info["defaults"] == {"cfg": 1.5}
    assert info["stats"]["dit_loss"] and info["stats"]["dit_val_loss"] and info["stats"]["vae_test_psnr_db"] > 0
    card = (trained / "MODEL_CARD.md").read_text()
    for text in ("digits", "10 classes", "PSNR on the test split", "DiT training: 1 epochs (3 steps)", "min"):
        assert text in card
    assert (trained / "samples" / "epoch_001.png").is_file()
    assert not (trained / ".save").exists()


def test_loads_through_the_backend_and_samples(trained):
    from mgd3.backends import load_backend
    from mgd3.train.pretrain_data import load_split
    from mgd3.core.sampling import CFGDenoiser, Plan, randn_per_item, sample

    b = load_backend(trained)
    assert b.latent_shape == (4, 4, 4) and b.resolution == 8 and b.image_channels == 1
    assert b.num_classes == 10 and b.null_label == 10 and not b.learned_sigma
    np.testing.assert_allclose(b.betas, np.linspace(1e-4, 0.02, 1000))
    assert b.defaults["cfg"] == 1.5 and b.id2label[7] == "7"
    # scaling factor = 1 / std of the train latents' means: the scaled train latents have std 1
    _, images, _ = load_split(_cfg(trained), "train", 200)
    z = b.encode(images.float() / 127.5 - 1.0)
    assert abs(z.std().item() - 1.0) < 1e-3
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    x = randn_per_item(gens, b.latent_shape, b.device)
    out = sample(CFGDenoiser(b.denoiser, 2.0, b.uncond()), x, Plan.from_betas(b.betas, 5), b.cond([0, 1, 2, 3]),
                 gens)
    imgs = b.decode(out)
    assert imgs.shape == (4, 1, 8, 8) and torch.isfinite(imgs).all()


def test_distill_runs_on_the_pretrained_model(trained, tmp_path):
    from mgd3.run.driver import DistillConfig, distill
    from mgd3.methods import SamplerConfig

    s = distill(DistillConfig(data="digits", out=str(tmp_path / "set"), model=str(trained), method="mgd3", ipc=2,
                              progress=False, sampler=SamplerConfig(steps=6)))
    assert s["images"] == 20
    m = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert m["config"]["sampler"]["cfg"] == 1.5  # the model's recommended CFG from mgd3.json


def test_a_model_recommends_method_options_and_the_user_overrides_them(trained, tmp_path):
    from mgd3.run.driver import DistillConfig, distill
    from mgd3.methods import SamplerConfig

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    info = json.loads((model / "mgd3.json").read_text())
    info["defaults"]["methods"] = {"mgd3": {"lambda": 0.25, "t_stop": 2}}  # `_` or `-`, as in --config
    (model / "mgd3.json").write_text(json.dumps(info))

    def options(out, **given):
        distill(DistillConfig(data="digits", out=str(tmp_path / out), model=str(model), method="mgd3", ipc=1,
                              classes=["0", "1"], progress=False, sampler=SamplerConfig(steps=4), options=given))
        return json.loads((tmp_path / out / "manifest.json").read_text())["config"]["options"]

    o = options("rec")
    assert o["lam"] == 0.25 and o["t_stop"] == 2
    o = options("mine", lam=0.1)
    assert o["lam"] == 0.1 and o["t_stop"] == 2
    info["defaults"]["methods"] = {"mgd3": {"lambda": 0.25, "strength": 0.5}}
    (model / "mgd3.json").write_text(json.dumps(info))
    with pytest.raises(Mgd3Error, match="recommends strength for method 'mgd3'"):
        options("bad")
    info["defaults"]["methods"] = {"mgd3": [0.25]}
    (model / "mgd3.json").write_text(json.dumps(info))
    with pytest.raises(Mgd3Error, match="must be a mapping of option: value"):
        options("bad")


def test_label_dropout_belongs_to_the_trainer(trained):
    from diffusers import DiTTransformer2DModel

    from mgd3.backends import load_backend

    dit = build_dit(_cfg("unused"), 4, 10).train()
    embedders = [m for m in dit.modules() if m.__class__.__name__ == "LabelEmbedding"]
    assert len(embedders) == 2  # one per block in diffusers' DiT
    assert all(m.dropout_prob == 0.0 and m.embedding_table.num_embeddings == 11 for m in embedders)
    x, t, y = torch.randn(64, 4, 4, 4), torch.full((64,), 500), torch.arange(64) % 10
    with torch.no_grad():  # no per-block label drops in train mode: two passes agree
        for p in dit.parameters():  # adaLN-Zero starts at a constant output: make it depend on the labels
            p.add_(torch.randn_like(p) * 0.1)
        assert torch.equal(dit(x, timestep=t, class_labels=y).sample, dit(x, timestep=t, class_labels=y).sample)
    saved = DiTTransformer2DModel.from_pretrained(trained / "transformer")
    tables = [m.embedding_table for m in saved.modules() if m.__class__.__name__ == "LabelEmbedding"]
    assert tables and all(tb.num_embeddings == 11 for tb in tables)  # the null-class row exists
    assert all(m.dropout_prob == 0.0 for m in load_backend(trained).label_embedders())


def test_interrupted_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    import mgd3.train.dit_stage as dit_stage

    direct = pretrain(_cfg(tmp_path / "direct", epochs=2))
    real_grid, calls = dit_stage.sample_grid, []

    def crash_in_epoch_2(*args, **kw):  # the grid is drawn just before the epoch's checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_grid(*args, **kw)

    monkeypatch.setattr(dit_stage, "sample_grid", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tmp_path / "resumed", epochs=2))
    monkeypatch.setattr(dit_stage, "sample_grid", real_grid)
    assert not (tmp_path / "resumed" / "model_index.json").exists()  # not a finished folder
    with pytest.raises(Mgd3Error, match="size='tiny'"):  # other options cannot continue these checkpoints
        pretrain(_cfg(tmp_path / "resumed", epochs=2, size="small"))
    resumed = pretrain(_cfg(tmp_path / "resumed", epochs=2))  # the same command again
    _assert_same_weights(direct, resumed)
    stats = json.loads((resumed / "mgd3.json").read_text())["stats"]
    assert len(stats["vae_epoch_s"]) == 1 and len(stats["dit_epoch_s"]) == 2  # nothing trained twice
    with pytest.raises(Mgd3Error, match="already holds a finished model"):
        pretrain(_cfg(tmp_path / "resumed", epochs=2))


def test_larger_epochs_continue_a_finished_model(tmp_path):
    direct = pretrain(_cfg(tmp_path / "direct", epochs=2))
    out = pretrain(_cfg(tmp_path / "grown", epochs=1))
    assert (out / "model_index.json").exists()
    pretrain(_cfg(out, epochs=2))
    _assert_same_weights(direct, out)
    assert len(json.loads((out / "mgd3.json").read_text())["stats"]["runs"]) == 2
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]


def test_time_budget_ends_training_early(tmp_path):
    out = pretrain(_cfg(tmp_path / "m", epochs=5, max_minutes=1e-6))
    stats = json.loads((out / "mgd3.json").read_text())["stats"]
    assert len(stats["dit_loss"]) == 1 and stats["dit_stopped_by_time_at_epoch"] == 1
    assert stats["dit_steps"] == [1]


def test_color_data_at_another_resolution(tmp_path):
    from mgd3.backends import load_backend

    out = pretrain(_cfg(tmp_path / "rgb", channels=3, resolution=16, classes=["3", "8"], max_steps=1))
    b = load_backend(out)
    assert b.image_channels == 3 and b.resolution == 16 and b.latent_shape == (4, 8, 8)
    assert b.num_classes == 2 and b.id2label == {0: "3", 1: "8"}


@pytest.mark.parametrize("kw, match", [
    (dict(size="huge"), "unknown --size 'huge'; known: " + ", ".join(SIZES)),
    (dict(data="no-such-data"), "unknown dataset 'no-such-data'"),
    (dict(epochs=0), "--epochs must be at least 1"),
    (dict(label_dropout=1.0), "--label-dropout"),
    (dict(resolution=9), "not divisible by the VAE's downsampling"),
    (dict(size="small", patch_size=3), "not divisible by the VAE's downsampling 2 (--vae-levels 2) times the patch"),
])
def test_bad_input_is_a_one_line_error(tmp_path, kw, match):
    with pytest.raises(Mgd3Error, match=match.replace("(", r"\(").replace(")", r"\)")):
        pretrain(_cfg(tmp_path / "m", **kw))
    assert not (tmp_path / "m").exists()  # nothing written


def test_refuses_a_folder_that_is_not_its_own(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Mgd3Error, match="not empty"):
        pretrain(_cfg(tmp_path, overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_help_and_errors(tmp_path):
    one = {"OMP_NUM_THREADS": "1"}
    r = run_cli("pretrain", "--help", env=one)
    assert r.returncode == 0
    for flag in ("--data", "--out", "--size", "--vae-epochs", "--epochs", "--batch-size", "--lr", "--bf16",
                 "--device", "--seed", "--max-steps", "--limit", "--quality", "--max-minutes", "--overwrite",
                 "--train-steps", "--threads", "--init", "--vae-decoder-epochs"):
        assert flag in r.stdout, flag
    r = run_cli("pretrain", "--data", "no-such-data", "--out", tmp_path / "m", env=one)
    assert r.returncode == 2 and r.stderr.startswith("mgd3: error: unknown dataset")
    assert not (tmp_path / "m").exists()


def test_train_steps_budget_with_a_partial_last_epoch(tmp_path):
    out = pretrain(_cfg(tmp_path / "m", train_steps=5))  # 3 steps per epoch (max_steps): epochs of 3 + 2
    stats = json.loads((out / "mgd3.json").read_text())["stats"]
    assert stats["dit_steps"] == [3, 5]
    with pytest.raises(Mgd3Error, match="already holds a finished model"):
        pretrain(_cfg(out, train_steps=5))
    pretrain(_cfg(out, train_steps=6))  # a larger budget continues
    assert json.loads((out / "mgd3.json").read_text())["stats"]["dit_steps"] == [3, 5, 6]


def test_a_model_recommends_settings_per_ipc_range(trained, tmp_path, caplog):
    """mgd3.json "by_ipc": the entry whose range holds the IPC merges its method options (a "cfg"
    there is that method's CFG scale); what the user passes wins; the log and manifest say what
    was taken."""
    import logging

    from mgd3.run.driver import DistillConfig, distill
    from mgd3.methods import SamplerConfig

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    info = json.loads((model / "mgd3.json").read_text())
    info["defaults"] = {"cfg": 1.5, "methods": {"mgd3": {"t_stop": 2}},
                        "by_ipc": [{"ipc": [2, 3], "methods": {"mgd3": {"lambda": 0.3, "cfg": 2.5}},
                                    "evidence": "a test"}]}
    (model / "mgd3.json").write_text(json.dumps(info))

    def run(out, ipc, cfg=None, **given):
        distill(DistillConfig(data="digits", out=str(tmp_path / out), model=str(model), method="mgd3", ipc=ipc,
                              classes=["0"], progress=False, sampler=SamplerConfig(steps=4, cfg=cfg), options=given))
        return json.loads((tmp_path / out / "manifest.json").read_text())

    m = run("ipc1", 1)  # no entry holds IPC 1: the folder-wide settings
    assert m["config"]["sampler"]["cfg"] == 1.5 and m["config"]["options"]["lam"] == 0.1
    assert m["config"]["options"]["t_stop"] == 2
    assert m["recommended"]["ipc_range"] is None and m["recommended"]["taken"] == {"--t-stop": 2, "--cfg": 1.5}
    with caplog.at_level(logging.INFO, logger="mgd3"):
        m = run("ipc2", 2)
    assert m["config"]["sampler"]["cfg"] == 2.5
    assert m["config"]["options"]["lam"] == 0.3 and m["config"]["options"]["t_stop"] == 2  # merged per method
    assert m["recommended"] == {"source": f"{model}/mgd3.json", "ipc_range": [2, 3],
                                "taken": {"--lambda": 0.3, "--t-stop": 2, "--cfg": 2.5}}
    assert "recommended by" in caplog.text and "for IPC 2..3" in caplog.text
    m = run("mine", 3, cfg=1.0, lam=0.2)  # what the user passes wins
    assert m["config"]["sampler"]["cfg"] == 1.0 and m["config"]["options"]["lam"] == 0.2
    assert m["recommended"]["taken"] == {"--t-stop": 2}

    plain = distill(DistillConfig(data="digits", out=str(tmp_path / "plain"), model=str(model), method="plain",
                                  ipc=2, classes=["0"], progress=False, sampler=SamplerConfig(steps=4)))
    assert plain.images == 2  # a method's recommended CFG is its own: plain keeps the folder-wide 1.5
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["config"]["sampler"]["cfg"] == 1.5
    distill(DistillConfig(data="digits", out=str(tmp_path / "real"), model=str(model), method="random-real",
                          ipc=2, classes=["0"], progress=False))
    assert json.loads((tmp_path / "real" / "manifest.json").read_text())["recommended"] is None  # no sampler, no CFG
    for bad, words in (([{"ipc": [3, 2], "cfg": 2.0}], "two integers"),
                       ([{"ipc": [1, 2], "methods": {"mgd3": {"cfg": -1}}}], "cfg of method mgd3"),
                       ([{"ipc": [1, 4]}, {"ipc": [4, 6]}], "overlap"),
                       ([{"ipc": [1, 2], "cfg": "nan"}], "cfg"),
                       ({"ipc": [1, 2]}, "must be a list")):
        info["defaults"]["by_ipc"] = bad
        (model / "mgd3.json").write_text(json.dumps(info))
        with pytest.raises(Mgd3Error, match=words):
            run("bad", 1)
        assert not (tmp_path / "bad").exists()  # refused before the output folder is made


def test_a_model_recommends_sampling_steps(trained, tmp_path):
    """mgd3.json may recommend the sampling steps as it does the CFG scale: folder-wide, per IPC range
    and per method; --steps wins; a method that does not sample takes none; bad counts are refused."""
    from mgd3.run.driver import DistillConfig, distill
    from mgd3.methods import DEFAULT_STEPS, SamplerConfig

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    info = json.loads((model / "mgd3.json").read_text())
    info["defaults"] = {"steps": 4, "by_ipc": [{"ipc": [2, 3], "methods": {"mgd3": {"steps": 6}}}]}
    (model / "mgd3.json").write_text(json.dumps(info))

    def run(out, ipc, method="mgd3", steps=None):
        distill(DistillConfig(data="digits", out=str(tmp_path / out), model=str(model), method=method, ipc=ipc,
                              classes=["0"], progress=False, sampler=SamplerConfig(steps=steps, cfg=1.5)))
        return json.loads((tmp_path / out / "manifest.json").read_text())

    m = run("ipc1", 1)  # folder-wide
    assert m["config"]["sampler"]["steps"] == 4 and m["recommended"]["taken"] == {"--steps": 4}
    m = run("ipc2", 2)  # the entry's, for mgd3; its default t_stop follows the steps (half of them)
    assert m["config"]["sampler"]["steps"] == 6 and m["recommended"]["taken"] == {"--steps": 6}
    assert m["method_info"]["stop_guidance"]["t_stop"] == 3
    assert run("plain", 2, method="plain")["config"]["sampler"]["steps"] == 4  # mgd3's steps are its own
    m = run("mine", 2, steps=5)  # what the user passes wins
    assert m["config"]["sampler"]["steps"] == 5 and m["recommended"] is None
    m = run("real", 2, method="random-real")  # no sampler: no steps taken, the run records the default
    assert m["config"]["sampler"]["steps"] == DEFAULT_STEPS and m["recommended"] is None
    for bad, words in (({"steps": 0}, "steps must be"), ({"steps": 2.5}, "steps must be"),
                       ({"by_ipc": [{"ipc": [1, 2], "methods": {"mgd3": {"steps": "ten"}}}]}, "steps"),
                       ({"by_ipc": [{"ipc": [1, 2], "steps": -3}]}, r"by_ipc \[1, 2\]\): steps")):
        info["defaults"] = bad
        (model / "mgd3.json").write_text(json.dumps(info))
        with pytest.raises(Mgd3Error, match=words):
            run("bad", 1)
        assert not (tmp_path / "bad").exists()  # refused before the output folder is made


def test_init_starts_the_dit_from_another_model(trained, tmp_path):
    from mgd3.backends import load_backend

    # another seed (its own random init) and an lr too small to move the weights: what is saved is the start
    out = pretrain(_cfg(tmp_path / "cont", vae=str(trained), init=str(trained), lr=1e-12, seed=5))
    a, b = _weights(trained), _weights(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # the EMA starts at the shipped weights
    fresh = _weights(pretrain(_cfg(tmp_path / "fresh", vae=str(trained), lr=1e-12, seed=5)))
    assert max((a[k] - fresh[k]).abs().max().item() for k in a) > 1e-2  # without --init: random weights
    card = (out / "MODEL_CARD.md").read_text()
    assert f"DiT initialised from `{trained}`" in card and "trained further (`--init`)" in card
    assert json.loads((out / "mgd3.json").read_text())["stats"]["dit_init"] == str(trained)
    assert load_backend(out).num_classes == 10


@pytest.mark.parametrize("kw, match", [
    (dict(init="NOWHERE"), "--init NOWHERE: no transformer/config.json there"),
    (dict(init="TRAINED", size="small"), "its DiT does not fit this configuration"),
    (dict(init="TRAINED", arch="unet"), "it does not take --arch unet"),
])
def test_init_bad_input_is_a_one_line_error(trained, tmp_path, kw, match):
    kw = {k: (str(trained) if v == "TRAINED" else str(tmp_path / v) if v == "NOWHERE" else v) for k, v in kw.items()}
    match = match.replace("NOWHERE", str(tmp_path / "NOWHERE"))
    with pytest.raises(Mgd3Error, match=match.replace("(", r"\(").replace(")", r"\)")):
        pretrain(_cfg(tmp_path / "m", vae=str(trained), **kw))
    assert not (tmp_path / "m").exists() or not (tmp_path / "m" / "model_index.json").exists()


def test_decoder_training_keeps_the_latents_and_the_dit(trained, tmp_path):
    from mgd3.backends import load_backend

    out = pretrain(_cfg(tmp_path / "sharp", vae=str(trained), init=str(trained), epochs=0, vae_decoder_epochs=2,
                       vae_lr=3e-3, max_steps=None))
    _assert_same_weights(trained, out)  # --epochs 0 with --init: the DiT as it was
    a, b = _weights(trained, "vae"), _weights(out, "vae")
    assert a.keys() == b.keys()
    for k in a:  # the encoder and its posterior projection are frozen; the decoder trained
        moved = not torch.equal(a[k], b[k])
        assert moved == (k.startswith("decoder.") or k.startswith("post_quant_conv.")), k
    vae_a, vae_b = (json.loads((m / "vae" / "config.json").read_text()) for m in (trained, out))
    assert vae_b["scaling_factor"] == vae_a["scaling_factor"]  # the DiT's latents keep their scale
    stats = json.loads((out / "mgd3.json").read_text())["stats"]
    assert len(stats["decoder_loss"]) == 2 and "dit_loss" not in stats
    assert stats["vae_test_psnr_db"] > stats["vae_test_psnr_db_before"] + 0.5  # the decoder learned
    card = (out / "MODEL_CARD.md").read_text()
    assert "its encoder frozen (the same latents) and its decoder trained 2 epochs here" in card
    assert "with --epochs 0 its weights are kept as they are" in card and "DiT training: none here" in card
    assert "AutoencoderKL, 2 levels, width 8, latent 4x4x4" in card
    b = load_backend(out)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(b.encode(x), load_backend(trained).encode(x))  # the same latents


@pytest.mark.parametrize("kw, match", [
    (dict(vae_decoder_epochs=1), "--vae-decoder-epochs trains the decoder of a reused VAE; give --vae"),
    (dict(epochs=0), "--epochs must be at least 1 (0 only with --init"),
    (dict(vae_decoder_epochs=-1), "vae-decoder-epochs"),
])
def test_decoder_training_bad_input_is_a_one_line_error(tmp_path, kw, match):
    with pytest.raises(Mgd3Error, match=match.replace("(", r"\(").replace(")", r"\)")):
        pretrain(_cfg(tmp_path / "m", **kw))
    assert not (tmp_path / "m").exists()


def test_interrupted_decoder_training_continues_from_its_checkpoint(trained, tmp_path, monkeypatch):
    from mgd3.train.checkpoints import Checkpoints

    kw = dict(vae=str(trained), init=str(trained), epochs=0, vae_decoder_epochs=2)
    direct = pretrain(_cfg(tmp_path / "direct", **kw))
    real_save, calls = Checkpoints.save, []

    def crash_at_epoch_2(self, stage, state, meta):
        calls.append(stage)
        if calls.count("decoder") == 2:
            raise KeyboardInterrupt
        return real_save(self, stage, state, meta)

    monkeypatch.setattr(Checkpoints, "save", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tmp_path / "resumed", **kw))
    monkeypatch.setattr(Checkpoints, "save", real_save)
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    resumed = pretrain(_cfg(tmp_path / "resumed", **kw))
    a, b = _weights(direct, "vae"), _weights(resumed, "vae")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((resumed / "mgd3.json").read_text())["stats"]["decoder_epoch_s"]) == 2
