"""Methods that need no model (`Method.needs == "nothing"`: random-real, dm) run on data mgd3
ships no model for, without loading one; the set has no latents and its manifest no model, and
it evaluates like any other. A method that samples still asks for a model, naming the ones that
need none."""

from __future__ import annotations

import json

import pytest

import mgd3
from conftest import run_cli


@pytest.mark.parametrize("method, extra", [("random-real", []), ("dm", ["--iterations", "2", "--batch-real", "4"])])
def test_a_model_free_method_runs_on_data_without_a_model(tmp_path, method, extra):
    out = tmp_path / method
    r = run_cli("distill", "--data", "digits", "--method", method, "--ipc", "1", "--classes", "0", "1",
                "--out", out, "--quiet", "--cache-dir", tmp_path / "cache", *extra)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"] is None and m["config"]["model"] is None and m["data"]["resolution"] == 8
    assert [c["label"] for c in m["classes"]] == [0, 1]
    assert not (out / "latents.pt").exists()
    assert m["profile"]["generate"]["forwards"] == 0  # no network of a model ran
    s = mgd3.load_set(out)
    assert s.images.shape == (2, 1, 8, 8) and s.latents is None
    result = mgd3.evaluate(s, seeds=[0], epochs=1, device="cpu", progress=False)
    assert 0.0 <= result["mean"] <= 100.0


def test_a_sampling_method_without_a_model_names_the_methods_that_need_none(tmp_path):
    r = run_cli("distill", "--data", "digits", "--method", "plain", "--ipc", "1", "--out", tmp_path / "x", "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mgd3: error:")]
    assert len(errors) == 1 and "ships no model for 'digits'" in errors[0] and "dm, random-real" in errors[0]
    assert not (tmp_path / "x").exists()
