"""`mgd3 distill` end to end through the real CLI, on a tiny real DiT and real digits data."""

import json

import pytest
import torch
from PIL import Image

from conftest import run_cli
from mgd3.distill import DistillConfig, distill
from mgd3.methods import SamplerConfig

FAST = ["--steps", "6", "--quiet"]


def _cfg(model, out, **kw):
    sampler = kw.pop("sampler", SamplerConfig(steps=6))
    return DistillConfig(data="digits", out=str(out), model=str(model), progress=False, sampler=sampler, **kw)


def test_cli_distill_writes_a_complete_set(digits_model, tmp_path):
    out = tmp_path / "set"
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--method", "mgd3", "--ipc", "2",
                "--seed", "3", "--out", out, "--batch-size", "7", "--t-stop", "2", *FAST)
    assert r.returncode == 0, r.stderr
    assert "wrote 20 images" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "mgd3-distilled-set/1" and m["method"] == "mgd3" and m["ipc"] == 2
    assert len(m["images"]) == 20 and len(m["classes"]) == 10
    assert m["config"]["options"]["t_stop"] == 2 and m["config"]["sampler"]["steps"] == 6
    assert m["mgd3_version"] and "git_commit" in m
    first = m["images"][0]
    assert set(first) >= {"path", "class_id", "class_index", "label", "index", "seed", "mode_id"}
    for rec in m["images"]:
        img = Image.open(out / rec["path"])
        assert img.size == (8, 8) and img.mode == "L"
    assert sorted(p.name for p in (out / "images").iterdir()) == [str(i) for i in range(10)]
    lat = torch.load(out / "latents.pt", weights_only=True)
    assert lat["latents"].shape == (20, 4, 4, 4) and lat["paths"] == [r["path"] for r in m["images"]]
    assert (out / "grid.png").is_file()
    # torchvision reads it as an ImageFolder
    from torchvision.datasets import ImageFolder
    assert len(ImageFolder(out / "images")) == 20


def test_same_seed_same_images_other_seed_different(digits_model, tmp_path):
    a = distill(_cfg(digits_model, tmp_path / "a", method="plain", ipc=1, classes=["1", "7"], seed=0))
    b = distill(_cfg(digits_model, tmp_path / "b", method="plain", ipc=1, classes=["1", "7"], seed=0))
    c = distill(_cfg(digits_model, tmp_path / "c", method="plain", ipc=1, classes=["1", "7"], seed=1))
    la, lb, lc = (torch.load(tmp_path / n / "latents.pt", weights_only=True)["latents"] for n in "abc")
    assert torch.equal(la, lb) and not torch.allclose(la, lc)
    assert a["images"] == b["images"] == c["images"] == 2


def test_batch_size_does_not_change_images(digits_model, tmp_path):
    distill(_cfg(digits_model, tmp_path / "b1", method="mgd3", ipc=3, classes=["0", "5"], batch_size=1))
    distill(_cfg(digits_model, tmp_path / "b4", method="mgd3", ipc=3, classes=["0", "5"], batch_size=4))
    l1 = torch.load(tmp_path / "b1" / "latents.pt", weights_only=True)["latents"]
    l4 = torch.load(tmp_path / "b4" / "latents.pt", weights_only=True)["latents"]
    # the same seeds per image; the network's batched matmuls may differ in the last float bits
    torch.testing.assert_close(l1, l4, atol=1e-4, rtol=1e-4)


def test_plain_and_mgd3_differ_only_in_guided_steps(digits_model, tmp_path):
    kw = dict(ipc=2, classes=["2", "3"])
    distill(_cfg(digits_model, tmp_path / "plain", method="plain", **kw))
    distill(_cfg(digits_model, tmp_path / "off", method="mgd3", options={"t_stop": 5}, **kw))  # no guided step
    distill(_cfg(digits_model, tmp_path / "on", method="mgd3", options={"t_stop": 2, "lam": 0.5}, **kw))
    p, off, on = (torch.load(tmp_path / n / "latents.pt", weights_only=True)["latents"] for n in ("plain", "off", "on"))
    assert torch.equal(p, off)
    assert not torch.allclose(p, on)


def test_mgd3_modes_come_from_kmeans_on_the_real_latents(digits_model, tmp_path):
    from mgd3.backends import load_backend
    from mgd3.data import load_data
    from mgd3.encode import encode_classes
    from mgd3.modes import find_modes

    distill(_cfg(digits_model, tmp_path / "s", method="mgd3", ipc=2, classes=["4"],
                 options={"t_stop": -1, "lam": 1.0, "guidance_form": "x0"}))
    b = load_backend(digits_model)
    data = load_data("digits", resolution=8, channels=1, classes=["4"])
    lat = encode_classes(b, data, [0], progress=False)[0]
    modes = torch.from_numpy(find_modes("kmeans", lat.numpy(), 2).modes).view(2, 4, 4, 4)
    got = torch.load(tmp_path / "s" / "latents.pt", weights_only=True)["latents"]
    # x0-form guidance at scale 1 over every step lands exactly on the modes
    torch.testing.assert_close(got, modes, atol=1e-4, rtol=1e-4)


def test_encodings_are_cached(digits_model, tmp_path, monkeypatch):
    distill(_cfg(digits_model, tmp_path / "a", method="mgd3", ipc=1, classes=["9"]))
    from mgd3.backends.dit import DiTBackend

    def fail(self, images):
        raise AssertionError("encoded again")

    monkeypatch.setattr(DiTBackend, "encode", fail)
    distill(_cfg(digits_model, tmp_path / "b", method="mgd3", ipc=1, classes=["9"]))


def test_yaml_config_and_flags(digits_model, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: mgd3\nipc: 1\nlambda: 0.2\nt-stop: 3\nsteps: 4\nclasses: ['8']\n")
    out = tmp_path / "o"
    r = run_cli("distill", "--config", cfg, "--data", "digits", "--model", digits_model, "--out", out,
                "--t-stop", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["options"]["lam"] == 0.2 and m["config"]["options"]["t_stop"] == 1
    assert m["config"]["sampler"]["steps"] == 4 and len(m["images"]) == 1


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'; known: "),
    (["--method", "plain", "--lambda", "0.1"], "method 'plain' takes no option --lambda"),
    (["--ipc", "500"], "IPC 500 is larger than class"),
    (["--t-stop", "99"], "--t-stop must be in -1..6"),
    (["--cfg", "-1"], "--cfg must be a finite number"),
    (["--lambda", "nan"], "--lambda must be a finite number"),
    (["--classes", "eleven"], "eleven"),
    (["--modes", "magic"], "unknown mode finder 'magic'"),
    (["--sampler", "heun"], "invalid choice"),
])
def test_bad_input_is_one_line_and_writes_nothing(digits_model, tmp_path, args, message):
    out = tmp_path / "o"
    base = ["distill", "--data", "digits", "--model", digits_model, "--out", out, "--steps", "6", "--quiet"]
    r = run_cli(*base, *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()


def test_non_empty_output_and_missing_model(digits_model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x.txt").write_text("keep")
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--out", out, "--quiet")
    assert r.returncode == 2 and "is not empty" in r.stderr
    r = run_cli("distill", "--data", "digits", "--model", tmp_path / "nope", "--out", tmp_path / "p")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("distill", "--data", "digits", "--out", tmp_path / "p")
    assert r.returncode == 2 and "no --model given" in r.stderr


def test_overwrite_replaces_outputs(digits_model, tmp_path):
    out = tmp_path / "o"
    distill(_cfg(digits_model, out, method="plain", ipc=2, classes=["1"]))
    distill(_cfg(digits_model, out, method="plain", ipc=1, classes=["2"], overwrite=True))
    m = json.loads((out / "manifest.json").read_text())
    assert [r["class_id"] for r in m["images"]] == ["2"]
    assert not (out / "images" / "1").exists()


def test_help_explains_every_flag():
    r = run_cli("distill", "--help")
    assert r.returncode == 0
    for flag in ("--data", "--model", "--method", "--ipc", "--seed", "--out", "--batch-size", "--lambda",
                 "--t-stop", "--cfg", "--steps", "--sampler", "--cfg-channels", "--modes", "--guidance-form"):
        assert flag in r.stdout


def test_labels_match_full_names_before_synonyms():
    from types import SimpleNamespace

    from mgd3.distill import map_labels

    backend = SimpleNamespace(id2label={0: "garter snake, grass snake", 1: "green snake, grass snake",
                                        2: "tench, Tinca tinca"}, num_classes=3, path=SimpleNamespace(name="m"))
    data = SimpleNamespace(class_ids=["n1", "n2", "n3"], labels=[None, None, None],
                           class_names=["green snake, grass snake", "garter snake", "Tench"])
    assert map_labels(data, backend) == [1, 0, 2]
    ambiguous = SimpleNamespace(class_ids=["x"], labels=[None], class_names=["grass snake"])
    with pytest.raises(Exception, match="class-map"):
        map_labels(ambiguous, backend)
