"""The class-conditional latent UNet backend (CompVis cin256 design: ClassEmbedder -> 1-token
cross-attention context) on tiny real diffusers folders, and `mgd3 distill` with it end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mgd3.backends import load_backend
from mgd3.cli import main
from mgd3.run.driver import DistillConfig, distill
from mgd3.errors import Mgd3Error
from mgd3.methods import SamplerConfig
from mgd3.core.sampling import CFGDenoiser
from mgd3.testing import build_ldm_folder

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def ldm_model(tmp_path_factory):
    """A tiny KL-first-stage LDM for 8x8 grayscale digits, names "0".."9"."""
    return build_ldm_folder(tmp_path_factory.mktemp("models") / "ldm-digits", image_channels=1, resolution=8,
                            class_names=DIGITS)


@pytest.fixture(scope="module")
def vq_model(tmp_path_factory):
    return build_ldm_folder(tmp_path_factory.mktemp("models") / "ldm-vq", image_channels=1, resolution=8,
                            class_names=DIGITS, first_stage="vq", latent_channels=3, learned_sigma=True)


def test_folder_layout_and_attributes(ldm_model):
    index = json.loads((ldm_model / "model_index.json").read_text())
    assert index["_class_name"] == "LDMClassConditionalPipeline"
    assert index["class_embedder"] == ["mgd3.backends.unet", "ClassEmbedder"]
    assert list(load_file(ldm_model / "class_embedder" / "diffusion_pytorch_model.safetensors")) == [
        "embedding_table.weight"]
    b = load_backend(ldm_model)
    assert b.name == "ldm" and b.latent_shape == (4, 4, 4) and b.resolution == 8 and b.image_channels == 1
    assert b.num_classes == 10 and not b.learned_sigma and b.id2label[3] == "3"
    # the null class is the config's extra row, 10 here; the LDM paper's schedule, float64
    assert b.null_label == 10 and b.uncond().tolist() == [10]
    assert b.label_embedders() == [b.class_embedder]
    ref = np.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=np.float64) ** 2
    assert b.betas.dtype == np.float64 and np.allclose(b.betas, ref, rtol=0, atol=1e-12)


def test_eps_is_the_unet_on_the_class_token_and_cfg_uses_the_null_row(ldm_model):
    b = load_backend(ldm_model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 4, 4, 4), generator=g)
    t = torch.tensor([999, 500, 3])
    y = b.cond([0, 7, 9])
    table = b.class_embedder.embedding_table.weight  # (11, 16)
    with torch.no_grad():
        want = b.unet(x, t, encoder_hidden_states=table[[0, 7, 9]][:, None]).sample
        want_u = b.unet(x, t, encoder_hidden_states=table[[10, 10, 10]][:, None]).sample
    torch.testing.assert_close(b.denoiser(x, t, y).eps, want, rtol=0, atol=0)
    guided = CFGDenoiser(b.denoiser, 3.0, b.uncond())(x, t, y).eps
    torch.testing.assert_close(guided, want_u + 3.0 * (want - want_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, want_u)
    with pytest.raises(Mgd3Error, match="outside the model's 0..9"):
        b.cond([10])


def test_vq_first_stage_and_learned_sigma(vq_model):
    b = load_backend(vq_model)
    assert b.vq and b.latent_shape == (3, 4, 4) and b.learned_sigma and b.scaling_factor == 1.0
    x = torch.rand((2, 1, 8, 8)) * 2 - 1
    z = b.encode(x)
    with torch.no_grad():
        h = b.vae.quant_conv(b.vae.encoder(x))  # not quantised, as VQModelInterface.encode
        quant = b.vae.quantize(h)[0]
        want = b.vae.decode(quant, force_not_quantize=True).sample.clamp(-1, 1)
    torch.testing.assert_close(z, h)
    torch.testing.assert_close(b.decode(z), want)  # decoding quantises first
    out = b.denoiser(torch.randn(2, 3, 4, 4), torch.tensor([10, 900]), b.cond([1, 2]))
    assert out.eps.shape == out.var_values.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("method,sampler", [("mgd3", "ddpm"), ("plain", "ddim"), ("d4m", "ddpm"),
                                            ("dmgd", "ddpm"), ("mgd3", "ddim")])
def test_cli_distill_every_generative_method_and_both_samplers(ldm_model, tmp_path, method, sampler):
    out = tmp_path / "o"
    assert main(["distill", "--model", str(ldm_model), "--data", "digits", "--classes", "3", "7", "--ipc", "2",
                 "--steps", "4", "--method", method, "--sampler", sampler, "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["backend"] == "ldm" and len(m["images"]) == 4
    assert [c["label"] for c in m["classes"]] == [3, 7]
    lat = torch.load(out / "latents.pt", weights_only=True)["latents"]
    assert lat.shape == (4, 4, 4, 4) and torch.isfinite(lat).all()


@pytest.mark.parametrize("method", ["random-real", "kmeans-real"])
def test_real_baselines_and_vq_model(vq_model, tmp_path, method):
    s = distill(DistillConfig(data="digits", out=str(tmp_path / "o"), model=str(vq_model), method=method, ipc=1,
                              classes=["0", "1"], progress=False, sampler=SamplerConfig(steps=3)))
    assert s["images"] == 2
    s = distill(DistillConfig(data="digits", out=str(tmp_path / "p"), model=str(vq_model), method="mgd3", ipc=1,
                              classes=["0", "1"], progress=False, sampler=SamplerConfig(steps=3)))
    assert s["images"] == 2


def test_dmgd_semantic_matching_mixes_the_class_embedding(ldm_model, tmp_path):
    """The semantic term hooks the class embedder: its output differs from plain sampling."""
    common = dict(data="digits", model=str(ldm_model), ipc=1, classes=["3", "7"], progress=False,
                  sampler=SamplerConfig(steps=4))
    distill(DistillConfig(out=str(tmp_path / "plain"), method="plain", **common))
    distill(DistillConfig(out=str(tmp_path / "sem"), method="dmgd", options={"semantic": True}, **common))
    a = torch.load(tmp_path / "plain" / "latents.pt", weights_only=True)["latents"]
    b = torch.load(tmp_path / "sem" / "latents.pt", weights_only=True)["latents"]
    assert a.shape == b.shape and not torch.allclose(a, b)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgd3: error: ") and len(err.splitlines()) == 1, err
    return err


def test_class_count_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    five = build_ldm_folder(tmp_path / "five", num_classes=5, image_channels=1, resolution=8,
                            class_names=DIGITS[:5])
    assert main(["distill", "--model", str(five), "--data", "digits", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "class '5'" in _one_line(capsys)
    nameless = tmp_path / "nameless"
    shutil.copytree(five, nameless)
    index = json.loads((nameless / "model_index.json").read_text())
    del index["id2label"]
    (nameless / "model_index.json").write_text(json.dumps(index))
    assert main(["distill", "--model", str(nameless), "--data", "digits", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    _one_line(capsys)
    # id2label naming more classes than the embedding table holds
    index["id2label"] = {str(i): n for i, n in enumerate(DIGITS)}
    (nameless / "model_index.json").write_text(json.dumps(index))
    assert main(["distill", "--model", str(nameless), "--data", "digits", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "id2label names label 5, but the class embedder has 5 classes" in _one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_bad_folders_are_one_line(ldm_model, tmp_path, capsys):
    def broken(name, edit):
        p = tmp_path / name
        shutil.copytree(ldm_model, p)
        edit(p)
        assert main(["distill", "--model", str(p), "--data", "digits", "--out", str(tmp_path / "o"),
                     "--quiet"]) == 2
        return _one_line(capsys)

    def set_cfg(sub, **kw):
        def edit(p):
            f = p / sub / "config.json"
            f.write_text(json.dumps({**json.loads(f.read_text()), **kw}))
        return edit

    assert "no class_embedder/" in broken("a", lambda p: shutil.rmtree(p / "class_embedder"))
    assert "cross_attention_dim (16) != class embedder embed_dim (8)" in broken(
        "b", lambda p: (p / "class_embedder" / "config.json").write_text(
            json.dumps({"_class_name": "ClassEmbedder", "num_classes": 10, "embed_dim": 8})))
    assert "could not load the class-conditional LDM" in broken(
        "c", lambda p: (p / "class_embedder" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk"))
    assert "unet in_channels (4) != VAE latent channels (3)" in broken("d", set_cfg("vae", latent_channels=3))
    assert "own class/added embedding" in broken("e", set_cfg("unet", class_embed_type="timestep"))
    assert not (tmp_path / "o").exists()


def test_presets_match_the_dit_sizes():
    from mgd3.backends.unet import build_unet

    counts = {s: sum(p.numel() for p in build_unet(4, 7, 10, s).parameters()) / 1e6 for s in ("small", "medium")}
    assert 1.3 < counts["small"] < 1.6 and 4.4 < counts["medium"] < 5.0  # DiT small 1.4 M, medium 4.6 M
    m = build_unet(4, 7, 10, "tiny")
    out = m(torch.randn(2, 4, 7, 7), timestep=torch.tensor([1, 999]), class_labels=torch.tensor([0, 10])).sample
    assert out.shape == (2, 4, 7, 7) and out.abs().max() == 0  # zero-initialised output conv
    with pytest.raises(Mgd3Error, match="unknown --size 'huge'"):
        build_unet(4, 7, 10, "huge")


def test_pretrain_arch_unet_and_a_reused_vae(tmp_path, capsys):
    first, second = tmp_path / "unet", tmp_path / "unet2"
    common = ["--data", "digits", "--arch", "unet", "--size", "tiny", "--epochs", "1", "--max-steps", "2",
              "--batch-size", "32", "--quiet"]
    assert main(["pretrain", "--out", str(first), "--vae-levels", "2", "--vae-width", "8", "--vae-epochs", "1",
                 *common]) == 0
    assert json.loads((first / "model_index.json").read_text())["_class_name"] == "LDMClassConditionalPipeline"
    assert "class-conditional latent UNet (LDM)" in (first / "MODEL_CARD.md").read_text()
    b = load_backend(first)
    assert b.name == "ldm" and b.latent_shape == (4, 4, 4) and b.num_classes == 10 and b.null_label == 10
    assert main(["pretrain", "--out", str(second), "--vae", str(first), *common]) == 0
    card = (second / "MODEL_CARD.md").read_text()
    assert f"VAE: reused, frozen, from `{first}`" in card
    b2 = load_backend(second)
    for p, q in zip(b.vae.parameters(), b2.vae.parameters()):
        assert torch.equal(p, q)  # only the denoiser trained
    assert b2.scaling_factor == pytest.approx(b.scaling_factor, rel=1e-5)
    assert not (second / ".checkpoints" / "vae.pt").exists()
    assert main(["distill", "--model", str(second), "--data", "digits", "--classes", "1", "2", "--ipc", "1",
                 "--steps", "3", "--method", "plain", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "u3"), "--vae", str(tmp_path / "nowhere"), *common]) == 2
    assert "no vae/config.json there" in _one_line(capsys)
