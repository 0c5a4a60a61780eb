"""The DiT backend on tiny real diffusers folders, loaded through the real loading code."""

import json
import shutil

import pytest
import torch

from mgd3.backends import load_backend
from mgd3.errors import Mgd3Error
from mgd3.testing import build_dit_folder


def test_dit_folder_layout_and_attributes(digits_model):
    index = json.loads((digits_model / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["3"] == "3"
    for sub in ("transformer", "vae", "scheduler"):
        assert (digits_model / sub).is_dir()
    b = load_backend(digits_model)
    assert b.latent_shape == (4, 4, 4) and b.resolution == 8 and b.image_channels == 1
    assert b.learned_sigma and b.num_classes == 10 and b.null_label == 10
    assert b.id2label[7] == "7"
    emb = [m for m in b.transformer.modules() if m.__class__.__name__ == "LabelEmbedding"]
    assert emb and all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 11 for m in emb)
    out = b.denoiser(torch.randn(2, 4, 4, 4), torch.tensor([999, 999]), b.cond([1, 2]))
    assert out.eps.shape == (2, 4, 4, 4) and out.var_values.shape == (2, 4, 4, 4)
    z = b.encode(torch.rand(3, 1, 8, 8) * 2 - 1)
    assert z.shape == (3, 4, 4, 4)
    assert b.decode(z).shape == (3, 1, 8, 8)


def test_legacy_transformer2dmodel_config_and_fixed_variance(tmp_path):
    p = build_dit_folder(tmp_path / "m", transformer_class_name="Transformer2DModel", learned_sigma=False)
    b = load_backend(p)
    assert not b.learned_sigma
    assert b.denoiser(torch.randn(1, *b.latent_shape), torch.tensor([5]), b.cond([0])).var_values is None


def test_encode_is_the_scaled_latent_mean(digits_model):
    b = load_backend(digits_model)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mean = b.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(b.encode(x), mean * b.vae.config.scaling_factor)


def test_bad_model_folders(tmp_path, digits_model):
    with pytest.raises(Mgd3Error, match="does not exist"):
        load_backend(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Mgd3Error, match="not a diffusers pipeline folder"):
        load_backend(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(digits_model, bad)
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(Mgd3Error, match="not valid JSON"):
        load_backend(bad)
    other = tmp_path / "other"
    shutil.copytree(digits_model, other)
    idx = json.loads((other / "model_index.json").read_text())
    idx["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(Mgd3Error, match="not supported"):
        load_backend(other)
    nov = tmp_path / "novae"
    shutil.copytree(digits_model, nov)
    shutil.rmtree(nov / "vae")
    with pytest.raises(Mgd3Error, match="no vae/"):
        load_backend(nov)


def test_latent_shape_mismatch_is_one_line(tmp_path):
    a = build_dit_folder(tmp_path / "a", latent_channels=4)
    b = build_dit_folder(tmp_path / "b", latent_channels=8)
    shutil.rmtree(a / "vae")
    shutil.copytree(b / "vae", a / "vae")
    with pytest.raises(Mgd3Error, match=r"VAE latent channels \(8\) != transformer in_channels \(4\)"):
        load_backend(a)


def test_hugging_face_cache_offline(tmp_path, monkeypatch, digits_model):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-dit" / "snapshots" / "0123abcd"
    shutil.copytree(digits_model, snap)
    (cache / "models--someone--tiny-dit" / "refs").mkdir()
    (cache / "models--someone--tiny-dit" / "refs" / "main").write_text("0123abcd")
    import huggingface_hub.constants

    # the hub reads HF_HUB_CACHE once at import; a user sets it before starting mgd3
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = load_backend("someone/tiny-dit")
    assert b.num_classes == 10 and b.path == snap
    with pytest.raises(Mgd3Error, match="HF_HUB_OFFLINE"):
        load_backend("someone/not-cached")


def test_null_class_at_1000_keeps_every_sample(digits_model, tmp_path):
    """The DiTPipeline layout (1001-row class tables, null at 1000) samples the same bits in mgd3,
    and pretrain --init reads it back as the model's own (n + 1)-row tables."""
    from mgd3.backends.dit import null_class_at_1000
    from mgd3.run.driver import DistillConfig, distill
    from mgd3.methods import SamplerConfig
    from mgd3.train.dit_stage import _own_class_rows

    moved = tmp_path / "model"
    shutil.copytree(digits_model, moved)
    null_class_at_1000(moved)
    b = load_backend(moved)
    assert (b.num_classes, b.null_label) == (10, 1000)
    tables = [m.embedding_table.weight for m in b.label_embedders()]
    old = [m.embedding_table.weight for m in load_backend(digits_model).label_embedders()]
    assert all(t.shape[0] == 1001 and torch.equal(t[:10], o[:10]) and torch.equal(t[1000], o[10])
               and not t[10:1000].any() for t, o in zip(tables, old))
    assert all(torch.equal(_own_class_rows(t, o), o) for t, o in zip(tables, old))
    with pytest.raises(Mgd3Error, match="class label 10 is outside"):
        b.cond([10])
    with pytest.raises(Mgd3Error, match="already at 1000"):
        null_class_at_1000(moved)
    sets = []
    for model in (digits_model, moved):  # CFG 2: the null class is used at every step
        out = tmp_path / f"set-{len(sets)}"
        distill(DistillConfig(data="digits", model=str(model), out=str(out), ipc=2, classes=["3", "8"],
                              progress=False, sampler=SamplerConfig(steps=3, cfg=2.0)))
        sets.append(out)
    a, c = (torch.load(s / "latents.pt", weights_only=True)["latents"] for s in sets)
    assert torch.equal(a, c)
    assert [p.read_bytes() for p in sorted((sets[0] / "images").rglob("*.png"))] == \
        [p.read_bytes() for p in sorted((sets[1] / "images").rglob("*.png"))]
