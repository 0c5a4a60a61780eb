"""The Stable Diffusion (text-to-image) backend on a tiny real diffusers/transformers folder,
loaded through the real loading code, and `mgd3 distill` with it end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from mgd3.backends import load_backend
from mgd3.cli import main
from mgd3.run.driver import DistillConfig, distill
from mgd3.errors import Mgd3Error
from mgd3.methods import SamplerConfig
from mgd3.core.sampling import CFGDenoiser, Plan, randn_per_item, respaced_timesteps, sample
from mgd3.testing import build_sd_folder


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def sd(sd_model):
    b = load_backend(sd_model)
    b.set_classes(["tench, Tinca tinca", "cat"], prompt="a photo of a {name}", negative_prompt="blurry")
    return b


def _text(b, prompt):
    ids = b.tokenizer([prompt], padding="max_length", max_length=b.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return b.text_encoder(ids)[0][0]  # (L, D)


def test_folder_layout_and_attributes(sd_model, sd):
    assert json.loads((sd_model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert sorted(p.name for p in (sd_model / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sd.name == "stable-diffusion" and sd.latent_shape == (4, 8, 8) and sd.resolution == 16
    assert sd.image_channels == 3 and not sd.learned_sigma and sd.defaults["cfg"] == 8.0
    # scaled_linear betas, float64, as diffusers computes them
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").betas.double().numpy()
    assert sd.betas.dtype == np.float64 and np.allclose(sd.betas, ref, atol=1e-9)


def test_prompts_from_class_names_and_negative_prompt(sd_model, sd):
    assert sd.prompts == ["a photo of a tench, Tinca tinca", "a photo of a cat"]
    assert sd.id2label == {0: "tench, Tinca tinca", 1: "cat"} and sd.num_classes == 2
    (table,) = sd.label_embedders()
    assert table.embedding_table.num_embeddings == 3  # two classes + the negative prompt
    emb = table(sd.cond([1, 0])).view(2, *sd._text_shape)
    torch.testing.assert_close(emb[0], _text(sd, "a photo of a cat"))
    torch.testing.assert_close(emb[1], _text(sd, "a photo of a tench, Tinca tinca"))
    torch.testing.assert_close(table(sd.uncond())[0].view(sd._text_shape), _text(sd, "blurry"))
    b = load_backend(sd_model)
    with pytest.raises(Mgd3Error, match="no classes yet"):
        b.cond([0])
    assert b.set_classes(["0", "1", "2"]) == [0, 1, 2]
    assert b.prompts == ["0", "1", "2"] and b.negative_prompt == ""  # docs/METHODS.md §2.4: the name line itself
    torch.testing.assert_close(b.label_embedders()[0](b.uncond())[0].view(b._text_shape), _text(b, ""))
    with pytest.raises(Mgd3Error, match=r"must contain \{name\}"):
        b.set_classes(["cat"], prompt="a photo")
    with pytest.raises(Mgd3Error, match="outside the model"):
        b.cond([3])


def test_cfg_scale_one_is_the_inner_model_and_negative_prompt_is_uncond(sd):
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 400]), sd.cond([0, 1])
    inner = sd.denoiser(x, t, cond).eps
    assert torch.equal(CFGDenoiser(sd.denoiser, 1.0, sd.uncond())(x, t, cond).eps, inner)
    eps_u = sd.denoiser(x, t, sd.uncond().expand(2)).eps
    torch.testing.assert_close(CFGDenoiser(sd.denoiser, 8.0, sd.uncond())(x, t, cond).eps,
                               eps_u + 8.0 * (inner - eps_u), atol=1e-5, rtol=1e-5)


def test_batch_equals_items_one_by_one(sd):
    plan, model = Plan.from_betas(sd.betas, 3), CFGDenoiser(sd.denoiser, 8.0, sd.uncond())
    seeds, labels = [11, 12, 13], [0, 1, 0]

    def run(seeds, labels):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = randn_per_item(gens, sd.latent_shape, "cpu")
        return sample(model, x, plan, sd.cond(labels), gens)

    batch = run(seeds, labels)
    single = torch.cat([run([s], [y]) for s, y in zip(seeds, labels)])
    # the same seeds per item; batched float32 matmuls differ in the last bits, and an untrained
    # UNet's x̂0 at t = 999 is large (|x| ~ 50): compare relative to the magnitude (float64 is exact)
    torch.testing.assert_close(batch, single, atol=2e-5 * float(batch.abs().max()), rtol=1e-5)


def test_encode_decode_and_resolution(sd_model):
    b = load_backend(sd_model)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(b.encode(x), b.vae.encode(x).latent_dist.mean * b.vae.config.scaling_factor)
    assert b.decode(b.encode(x)).shape == (2, 3, 16, 16)
    b.set_resolution(24)
    assert b.resolution == 24 and b.latent_shape == (4, 12, 12)
    b.set_classes(["cat"])
    assert b.denoiser(torch.randn(1, 4, 12, 12), torch.tensor([5]), b.cond([0])).eps.shape == (1, 4, 12, 12)
    assert b.decode(torch.randn(1, 4, 12, 12)).shape == (1, 3, 24, 24)
    with pytest.raises(Mgd3Error, match="multiple of 2"):
        b.set_resolution(25)


def test_v_prediction_becomes_eps_and_other_types_are_refused(sd_model, tmp_path):
    v = tmp_path / "v"
    shutil.copytree(sd_model, v)
    cfg_file = v / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    b = load_backend(v)
    b.set_classes(["cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([700])
    with torch.no_grad():
        raw = b.unet(x, t, encoder_hidden_states=b.text_embeddings(["cat"])).sample
    a = float(np.cumprod(1 - b.betas)[700])
    torch.testing.assert_close(b.denoiser(x, t, b.cond([0])).eps, (1 - a) ** 0.5 * x + a**0.5 * raw)
    cfg_file.write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    with pytest.raises(Mgd3Error, match="prediction_type 'sample' is not supported"):
        load_backend(v)


def test_sd_stop_at_timestep_500_is_t_stop_24_of_50():
    ts = respaced_timesteps(1000, 50)
    assert [i for i, t in enumerate(ts) if t > 500] == list(range(25, 50))  # guided while index > 24


def test_cli_distill_mgd3_and_plain(sd_model, tmp_path):
    out = tmp_path / "mgd3"
    r = run_cli("distill", "--model", sd_model, "--data", "digits", "--ipc", "2", "--steps", "3",
                "--method", "mgd3", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote 20 images" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["backend"] == "stable-diffusion" and m["config"]["sampler"]["cfg"] == 8.0
    assert [c["label"] for c in m["classes"]] == list(range(10)) and len(m["images"]) == 20
    assert all(Image.open(out / rec["path"]).size == (16, 16) for rec in m["images"])
    assert torch.load(out / "latents.pt", weights_only=True)["latents"].shape == (20, 4, 8, 8)
    assert (out / "grid.png").is_file()
    out = tmp_path / "plain"  # the same CLI in this process (saves a Python start)
    assert main(["distill", "--model", str(sd_model), "--data", "digits", "--classes", "3", "7", "--ipc", "2",
                 "--steps", "3", "--method", "plain", "--prompt", "a photo of the digit {name}",
                 "--negative-prompt", "blurry", "--save-resolution", "8", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["prompt"] == "a photo of the digit {name}" and m["config"]["negative_prompt"] == "blurry"
    assert m["data"]["resolution"] == 8 and len(m["images"]) == 4
    assert all(Image.open(out / rec["path"]).size == (8, 8) for rec in m["images"])


@pytest.mark.parametrize("method", ["d4m", "dmgd", "random-real", "kmeans-real"])
def test_every_other_method_runs_on_sd(sd_model, tmp_path, method):
    cfg = DistillConfig(data="digits", out=str(tmp_path / "o"), model=str(sd_model), method=method, ipc=1,
                        classes=["0", "1"], progress=False, resolution=24, sampler=SamplerConfig(steps=3))
    s = distill(cfg)
    assert s["images"] == 2
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert all(Image.open(tmp_path / "o" / rec["path"]).size == (24, 24) for rec in m["images"])


def test_bad_input_is_one_line(sd_model, digits_model, tmp_path, capsys):
    xl = tmp_path / "xl"
    shutil.copytree(sd_model, xl)
    idx = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps({**idx, "_class_name": "StableDiffusionXLPipeline"}))
    assert main(["distill", "--model", str(xl), "--data", "digits", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgd3: error: ") and len(err.splitlines()) == 1
    assert "pipeline class 'StableDiffusionXLPipeline' is not supported" in err and "StableDiffusionPipeline" in err
    with pytest.raises(Mgd3Error, match="need a text-to-image model"):
        distill(DistillConfig(data="digits", out=str(tmp_path / "p"), model=str(digits_model), prompt="{name}",
                              progress=False))
    with pytest.raises(Mgd3Error, match="generates at 8 px only"):
        distill(DistillConfig(data="digits", out=str(tmp_path / "p"), model=str(digits_model), resolution=16,
                              progress=False))
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()
