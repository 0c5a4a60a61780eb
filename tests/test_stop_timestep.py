"""`--t-stop-timestep T`: stop guidance by training timestep (guide while t > T), for DiT and
Stable Diffusion; the manifest records the index and the timestep where guidance stopped."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from mgd3.run.driver import DistillConfig, distill
from mgd3.methods import SamplerConfig
from mgd3.core.sampling import respaced_timesteps
from mgd3.testing import build_sd_folder


def _run(model, out, steps=10, sampler="ddpm", **options):
    distill(DistillConfig(data="digits", out=str(out), model=str(model), method="mgd3", ipc=2, classes=["4"],
                          progress=False, device="cpu", sampler=SamplerConfig(sampler=sampler, steps=steps),
                          options=options))
    m = json.loads((out / "manifest.json").read_text())
    return torch.load(out / "latents.pt", weights_only=True)["latents"], m["method_info"]["stop_guidance"]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_t_stop_timestep_is_the_matching_index(digits_model, tmp_path, sampler):
    # 10 steps of 1000: timesteps 0, 111, 222, 333, 444, 555, ...; t > 500 <=> index > 4
    assert respaced_timesteps(1000, 10)[4:6] == [444, 555]
    by_t, info_t = _run(digits_model, tmp_path / "t", sampler=sampler, t_stop_timestep=500)
    by_i, info_i = _run(digits_model, tmp_path / "i", sampler=sampler, t_stop=4)
    assert torch.equal(by_t, by_i)
    assert info_t == {"t_stop": 4, "t_stop_timestep": 500, "guided_steps": 5,
                      "stopped_at": {"index": 4, "timestep": 444}, "last_guided": {"index": 5, "timestep": 555}}
    assert info_i == {**info_t, "t_stop_timestep": None}
    other, _ = _run(digits_model, tmp_path / "o", sampler=sampler, t_stop_timestep=600)  # index > 5
    assert not torch.equal(other, by_t)


def test_t_stop_extremes_and_the_paper_default(digits_model, tmp_path):
    _, info = _run(digits_model, tmp_path / "all", t_stop_timestep=-1)
    assert info["t_stop"] == -1 and info["guided_steps"] == 10 and info["stopped_at"] is None
    _, info = _run(digits_model, tmp_path / "none", t_stop=10)  # docs/METHODS.md §2.3: t_stop = steps guides nothing
    assert info["guided_steps"] == 0 and info["last_guided"] is None
    assert info["stopped_at"] == {"index": 9, "timestep": 999}


def test_t_stop_and_t_stop_timestep_exclude_each_other(digits_model, tmp_path):
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--ipc", "1", "--classes", "0",
                "--steps", "4", "--t-stop", "2", "--t-stop-timestep", "500", "--out", tmp_path / "x", "--quiet")
    errors = [line for line in r.stderr.splitlines() if line.startswith("mgd3: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr
    assert errors[0].startswith("mgd3: error: --t-stop and --t-stop-timestep are mutually exclusive")
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--ipc", "1", "--classes", "0",
                "--steps", "4", "--t-stop-timestep", "1000", "--out", tmp_path / "y", "--quiet")
    assert r.returncode == 2 and "--t-stop-timestep must be in -1..999" in r.stderr
    assert not (tmp_path / "y" / "manifest.json").exists()


def test_stable_diffusion_stops_at_timestep_500_through_the_cli(tmp_path):
    """The paper's SD variant: guide while the training timestep > 500 (50 steps: index > 24)."""
    sd = build_sd_folder(tmp_path / "sd")
    out = tmp_path / "o"
    r = run_cli("distill", "--model", sd, "--data", "digits", "--classes", "1", "--ipc", "1", "--steps", "50",
                "--t-stop-timestep", "500", "--out", out, "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "manifest.json").read_text())["method_info"]["stop_guidance"]
    ts = respaced_timesteps(1000, 50)
    assert info["t_stop"] == 24 and info["guided_steps"] == 25
    assert info["stopped_at"] == {"index": 24, "timestep": ts[24]} and ts[24] <= 500 < ts[25]
