"""The Python API (mgd3.distill / evaluate / load_set / load_model), including the README's example
exactly as the README prints it."""

import json
import re
from pathlib import Path

import pytest
import torch

import mgd3
from mgd3.errors import Mgd3Error

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST is not installed")
FAST = dict(steps=4, progress=False)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@needs_fmnist
def test_readme_python_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its runs/ folder goes to the test's folder
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    s, again, result = scope["s"], scope["again"], scope["result"]
    assert s.images.shape == (10, 1, 28, 28) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == list(range(10)) and s.class_names[0] == "T-shirt/top"
    assert torch.equal(again.images, s.images) and again.manifest["config"]["options"]["lam"] == 0.3
    assert s.summary["images"] == 10 and not s.summary["complete"]
    first = mgd3.load_set(tmp_path / "runs" / "api-lambda0.1")
    assert first.manifest["config"]["options"]["lam"] == 0.1
    assert not torch.equal(first.latents, again.latents)  # λ reached the sampler
    assert result["set"]["num_images"] == 10 and result["seeds"] == [0] and len(result["runs"]) == 1
    assert result["mean"] == result["runs"][0]["final_acc"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("torch.Size([10, 1, 28, 28]) [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] T-shirt/top")
    assert result["arch"] == "convnet-3" and out[-1] == f"convnet-3: {result['mean']:.1f}% test accuracy"


def test_a_loaded_backend_serves_runs_without_reloading(digits_model, tmp_path, monkeypatch):
    by_path = mgd3.distill("digits", tmp_path / "a", model=digits_model, method="mgd3", ipc=2,
                           classes=["3", "8"], **FAST)
    model = mgd3.load_model(digits_model, device="cpu")

    def no_reload(*a, **k):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr("mgd3.run.driver.load_backend", no_reload)
    loaded = mgd3.distill("digits", tmp_path / "b", model=model, method="mgd3", ipc=2, classes=["3", "8"], **FAST)
    assert torch.equal(by_path.latents, loaded.latents) and torch.equal(by_path.images, loaded.images)
    assert loaded.manifest["model"]["path"] == by_path.manifest["model"]["path"]
    again = mgd3.distill("digits", tmp_path / "c", model=model, method="plain", ipc=1, classes=["3"], **FAST)
    assert len(again) == 1 and again.class_ids == ["3"]


@pytest.mark.parametrize("options", [{"lambda": 0.5, "t_stop": 2}, {"lam": 0.5, "t-stop": 2},
                                     {"lambda": 0.5, "--t-stop": 2}])
def test_method_options_by_documented_or_field_name(digits_model, tmp_path, options):
    s = mgd3.distill("digits", tmp_path / "s", model=digits_model, ipc=1, classes=["1"], options=options, **FAST)
    assert s.manifest["config"]["options"]["lam"] == 0.5 and s.manifest["config"]["options"]["t_stop"] == 2


def test_python_names_of_options_also_work_as_keywords(digits_model, tmp_path):
    s = mgd3.distill("digits", tmp_path / "s", model=digits_model, ipc=1, classes=["1"], t_stop=3, mode_seed=1, **FAST)
    assert s.manifest["config"]["options"]["t_stop"] == 3 and s.manifest["config"]["options"]["mode_seed"] == 1


def test_option_errors_list_the_names_a_method_takes(digits_model, tmp_path):
    with pytest.raises(Mgd3Error) as e:
        mgd3.distill("digits", tmp_path / "s", model=digits_model, options={"lambda": 0.3, "strenght": 1}, **FAST)
    msg = str(e.value)
    assert "does not take 'strenght'" in msg and "lambda" not in msg.split(";")[0]
    assert "--lambda, --t-stop" in msg and "lambda, t_stop" in msg
    with pytest.raises(Mgd3Error, match="method 'plain' takes no option --lambda"):
        mgd3.distill("digits", tmp_path / "s", model=digits_model, method="plain", options={"lambda": 0.3}, **FAST)
    with pytest.raises(Mgd3Error, match="given twice"):
        mgd3.distill("digits", tmp_path / "s", model=digits_model, options={"lambda": 0.3, "lam": 0.1}, **FAST)
    with pytest.raises(Mgd3Error, match=r"distill\(\) takes no setting 'ipcs'.*--lambda"):
        mgd3.distill("digits", tmp_path / "s", model=digits_model, ipcs=3)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_load_set_matches_the_manifest_and_refuses_paths_outside(digits_model, tmp_path):
    s = mgd3.distill("digits", tmp_path / "s", model=digits_model, method="plain", ipc=2, classes=["7", "2"], **FAST)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert s.class_ids == [c["class_id"] for c in m["classes"]] == ["7", "2"]  # the order asked for
    assert s.labels.tolist() == [r["class_index"] for r in m["images"]] == [0, 0, 1, 1]
    assert s.model_labels.tolist() == [7, 7, 2, 2]
    assert s.latents.shape == (4, 4, 4, 4)
    m["images"][0]["path"] = "../../outside.png"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Mgd3Error, match="leaves the set folder"):
        mgd3.load_set(tmp_path / "s")


def test_evaluate_rejects_unknown_settings_by_name(tmp_path):
    with pytest.raises(Mgd3Error, match=r"evaluate\(\) takes no setting 'epoch'.*epochs"):
        mgd3.evaluate(tmp_path, epoch=2)


def test_mgd3_exports_the_api_as_plain_functions():
    import inspect

    assert {"distill", "evaluate", "load_set", "load_model", "DistilledSet"} <= set(mgd3.__all__)
    for name in ("distill", "evaluate", "load_set", "load_model"):
        f = getattr(mgd3, name)
        assert inspect.isfunction(f) and f.__module__ in ("mgd3.api", "mgd3.io.set_reader"), name
        assert f.__doc__ and "*args" not in str(inspect.signature(f)), name
    assert list(inspect.signature(mgd3.distill).parameters)[:2] == ["data", "out"]
    import importlib

    for module in ("mgd3.evaluation", "mgd3.run.driver"):  # importing the stages' modules hides no function
        importlib.import_module(module)

    assert inspect.isfunction(mgd3.distill) and inspect.isfunction(mgd3.evaluate)
    assert mgd3.DistilledSet is importlib.import_module("mgd3.io.set_reader").DistilledSet  # one DistilledSet
