"""`mgd3 distill` end to end through the real CLI, on a tiny real DiT and real digits data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from inprocess import run_main
from mgd3.run.driver import DistillConfig, distill
from mgd3.methods import SamplerConfig
from reference_models import record_decoded_latents

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
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:03d}-{i}" for i in range(10)]
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
    from mgd3.io.data import load_data
    from mgd3.core.encode import encode_classes
    from mgd3.core.mode_discovery import find_modes

    distill(_cfg(digits_model, tmp_path / "s", method="mgd3", ipc=2, classes=["4"],
                 options={"t_stop": -1, "lam": 1.0, "guidance_form": "x0"}))
    b = load_backend(digits_model)
    data = load_data("digits", resolution=8, channels=1, classes=["4"])
    lat = encode_classes(b, data, [0], progress=False)[0]
    modes = torch.from_numpy(find_modes("kmeans", lat.numpy(), 2).points).view(2, 4, 4, 4)
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


def test_yaml_config_and_flags(digits_model, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: mgd3\nipc: 1\nlambda: 0.2\nt-stop: 3\nsteps: 4\nclasses: ['8']\n")
    out = tmp_path / "o"
    r = run_main(capsys, "distill", "--config", cfg, "--data", "digits", "--model", digits_model, "--out", out,
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
def test_bad_input_is_one_line_and_writes_nothing(digits_model, tmp_path, args, message, capsys):
    out = tmp_path / "o"
    base = ["distill", "--data", "digits", "--model", digits_model, "--out", out, "--steps", "6", "--quiet"]
    r = run_main(capsys, *base, *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()


def test_non_empty_output_and_missing_model(digits_model, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x.txt").write_text("keep")
    r = run_main(capsys, "distill", "--data", "digits", "--model", digits_model, "--out", out, "--quiet")
    assert r.returncode == 2 and "is not empty" in r.stderr
    assert (out / "x.txt").read_text() == "keep"
    r = run_main(capsys, "distill", "--data", "digits", "--model", tmp_path / "nope", "--out", tmp_path / "p")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_main(capsys, "distill", "--data", "digits", "--out", tmp_path / "p")
    assert r.returncode == 2 and "no --model given" in r.stderr


def test_overwrite_replaces_outputs(digits_model, tmp_path):
    out = tmp_path / "o"
    distill(_cfg(digits_model, out, method="plain", ipc=2, classes=["1"]))
    distill(_cfg(digits_model, out, method="plain", ipc=1, classes=["2"], overwrite=True))
    m = json.loads((out / "manifest.json").read_text())
    assert [r["class_id"] for r in m["images"]] == ["2"]
    assert not (out / "images" / "000-1").exists() and (out / "images" / "000-2").is_dir()


def test_help_explains_every_flag(capsys):
    r = run_main(capsys, "distill", "--help")
    assert r.returncode == 0
    for flag in ("--data", "--model", "--method", "--ipc", "--seed", "--out", "--batch-size", "--lambda",
                 "--t-stop", "--cfg", "--steps", "--sampler", "--cfg-channels", "--modes", "--guidance-form"):
        assert flag in r.stdout


def test_labels_match_full_names_before_synonyms():
    from types import SimpleNamespace

    from mgd3.backends.labels import map_labels

    backend = SimpleNamespace(id2label={0: "garter snake, grass snake", 1: "green snake, grass snake",
                                        2: "tench, Tinca tinca"}, num_classes=3, path=SimpleNamespace(name="m"))
    data = SimpleNamespace(class_ids=["n1", "n2", "n3"], labels=[None, None, None],
                           class_names=["green snake, grass snake", "garter snake", "Tench"])
    assert map_labels(data, backend) == [1, 0, 2]
    ambiguous = SimpleNamespace(class_ids=["x"], labels=[None], class_names=["grass snake"])
    with pytest.raises(Exception, match="class-map"):
        map_labels(ambiguous, backend)


# --------------------------------------------------------------------------- torchvision conventions

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def assert_image_folder_agrees(out: Path) -> None:
    """torchvision's ImageFolder(OUT/images) gives every image the manifest's class index."""
    from torchvision.datasets import ImageFolder

    m = json.loads((out / "manifest.json").read_text())
    folder = ImageFolder(out / "images")
    by_folder = {Path(r["path"]).parent.name: r["class_index"] for r in m["images"]}
    assert folder.class_to_idx == by_folder
    index = {(out / r["path"]).resolve(): r["class_index"] for r in m["images"]}
    assert [index[Path(f).resolve()] for f, _ in folder.samples] == [t for _, t in folder.samples]
    assert sorted(folder.targets) == sorted(r["class_index"] for r in m["images"])


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST is not installed")
def test_image_folder_indices_agree_with_the_manifest_on_fashion_mnist(tmp_path):
    from torchvision.datasets import ImageFolder

    distill(DistillConfig(data="fashion-mnist", out=str(tmp_path / "f"), method="plain", ipc=1, progress=False,
                          sampler=SamplerConfig(steps=2)))
    assert_image_folder_agrees(tmp_path / "f")
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert m["classes"][0]["class_id"] == "T-shirt_top" and m["classes"][9]["class_id"] == "Ankle_boot"
    idx = ImageFolder(tmp_path / "f" / "images").class_to_idx
    assert idx["000-T-shirt_top"] == 0 and idx["009-Ankle_boot"] == 9  # not alphabetical by class id
    assert Image.open(tmp_path / "f" / m["images"][0]["path"]).mode == "L"  # grayscale, one channel


def test_image_folder_indices_agree_with_the_manifest_on_an_unsorted_imagenet_subset(tmp_path):
    """imageidc lists its wnids in the ImageNet-100 order, not sorted: n02869837 comes first."""
    from mgd3.io.imagenet_classes import IMAGEIDC, WNID_NAMES
    from mgd3.testing import build_dit_folder

    assert IMAGEIDC != sorted(IMAGEIDC)
    root = tmp_path / "imagenet"
    for k, w in enumerate(IMAGEIDC):
        for split in ("train", "val"):
            (root / split / w).mkdir(parents=True)
            Image.fromarray(np.full((10, 10, 3), 20 * k, dtype=np.uint8)).save(root / split / w / f"{w}_{split}.JPEG")
    model = build_dit_folder(tmp_path / "model", num_classes=10, image_channels=3, resolution=8,
                             class_names=[WNID_NAMES[w] for w in sorted(IMAGEIDC)])  # labels by sorted wnid
    out = tmp_path / "set"
    distill(DistillConfig(data="imageidc", data_root=str(root), out=str(out), model=str(model), method="plain",
                          ipc=2, progress=False, sampler=SamplerConfig(steps=2)))
    assert_image_folder_agrees(out)
    m = json.loads((out / "manifest.json").read_text())
    assert [c["class_id"] for c in m["classes"]] == IMAGEIDC
    assert [c["label"] for c in m["classes"]] == [sorted(IMAGEIDC).index(w) for w in IMAGEIDC]
    assert sorted(p.name for p in (out / "images").iterdir())[0] == f"000-{IMAGEIDC[0]}"


def test_shipped_model_in_diffusers_dit_pipeline_at_guidance_4():
    """diffusers' DiTPipeline passes label 1000 as the null class: the shipped model keeps it there
    (1001-row class tables), names its classes both ways in id2label, and samples the classes asked
    for at guidance 4, as judged by a real-data ConvNet-3 of mgd3.train.quality."""
    from diffusers import DiTPipeline

    from mgd3.backends import load_backend
    from mgd3.backends.labels import map_labels
    from mgd3.io.data import load_data
    from mgd3.run.driver import shipped_model
    from mgd3.evaluation.train import TensorSet, tensor_set
    from mgd3.methods import ClassInfo, Context, Item, get_method
    from mgd3.train.quality import classifier_accuracy, per_class_subset, train_classifier
    from mgd3.core.sampling import Plan

    folder = shipped_model("fashion-mnist")
    card = (folder / "MODEL_CARD.md").read_text()
    assert "null class at label 1000" in card and "any guidance scale" in card
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    assert pipe.get_label_ids(["Ankle_boot", "Ankle boot", "T-shirt/top", "T-shirt_top", "Bag"]) == [9, 9, 0, 0, 8]
    asked = list(range(10)) + [9, 0]
    items = [Item(ClassInfo(y, str(y), str(y), y), k, 1000 + k) for k, y in enumerate(asked)]
    seen = record_decoded_latents(pipe)
    out = pipe(class_labels=asked, guidance_scale=4.0, num_inference_steps=15, output_type="np",
               generator=[torch.Generator().manual_seed(it.seed) for it in items])
    made = torch.from_numpy((out.images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)  # (12, 1, 28, 28)

    # mgd3 reads the same folder as 10 classes with the null class at 1000
    backend = load_backend(folder)
    assert (backend.num_classes, backend.null_label) == (10, 1000)
    train_data = load_data("fashion-mnist", "train", resolution=28, channels=1)
    assert map_labels(train_data, backend) == list(range(10))
    # ... and samples what DiTPipeline samples: plain DDIM, CFG 4 on all channels, the pipeline's timesteps
    classes = list({it.cls.index: it.cls for it in items}.values())
    ctx = Context(backend, None, classes, len(items), 0, SamplerConfig(sampler="ddim", steps=15, cfg=4.0),
                  progress=False)
    ctx.plan = Plan.from_timesteps(backend.betas, [int(t) for t in pipe.scheduler.timesteps])
    ours = get_method("plain")().generate(ctx, items).latents
    assert (ours - seen["latents"]).abs().max().item() <= 1e-5

    targets = torch.as_tensor(np.asarray(train_data.targets))
    idx = per_class_subset(targets, 15, seed=0)  # a weak classifier (about 60 %), cheap on one thread
    real = tensor_set(train_data.dataset(idx.tolist()))
    test_data = load_data("fashion-mnist", "test", resolution=28, channels=1)
    test_targets = torch.as_tensor(np.asarray(test_data.targets))
    held = tensor_set(test_data.dataset(per_class_subset(test_targets, 10, seed=0).tolist()))
    net, real_acc = train_classifier(real, held, 10, epochs=5, seed=0)
    assert real_acc > 45  # better than chance (10 %) by far
    acc = classifier_accuracy(net, TensorSet(made, torch.as_tensor(asked)))
    assert acc >= 200 / 3, f"only {acc:.0f} % of the guided samples are the class asked for"


