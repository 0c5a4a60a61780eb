"""CFG in a limited interval of noise levels (Kynkäänniemi et al., NeurIPS 2024), `--cfg-interval`.

The paper's rule, in its notation: the guided denoiser is
    D_w(x; σ) = w·D(x; σ | c) + (1 - w)·D(x; σ)   if σ ∈ (σ_lo, σ_hi],   D(x; σ | c) otherwise,
with D the denoiser (the predicted clean sample) at noise level σ. A VP model at training timestep t
is the EDM model at σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) (x_t / sqrt(ᾱ_t) = x0 + σ_t·ε), and its D is
x̂0 = (x_t - sqrt(1 - ᾱ_t)·ε) / sqrt(ᾱ_t). The reference below applies that rule literally, in D,
to an analytic model, and mgd3's sampler must give the same samples.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mgd3.methods import SamplerConfig
from mgd3.core.sampling import (CFGDenoiser, ModelOutput, Plan, cfg_interval_timesteps, noise_levels, randn_per_item,
                           sample)

BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)
SHAPE = (2, 3, 3)
NULL = 1  # the unconditional label of the analytic model
SCALE = 3.0
STEPS = 20


class TwoGaussians:
    """Exact ε of Gaussian data per label: label 0 (the class) N(c, 0.5² I), label NULL (the
    unconditional model) N(u, I): ε = sqrt(1 - ᾱ)·(x_t - sqrt(ᾱ)·μ) / (ᾱ·s² + 1 - ᾱ). The samples
    keep the noise of every step, so a step guided or not shows in them."""

    def __init__(self):
        n = math.prod(SHAPE)
        self.mu = torch.stack([torch.linspace(-1, 1, n).view(SHAPE), torch.linspace(1, -0.5, n).view(SHAPE)])
        self.var = torch.tensor([0.25, 1.0])

    def __call__(self, x_t, t, cond):
        a = torch.as_tensor(ABAR[t.numpy()], dtype=x_t.dtype).view(-1, 1, 1, 1)
        v = self.var[cond].view(-1, 1, 1, 1)
        return ModelOutput((1 - a).sqrt() * (x_t - a.sqrt() * self.mu[cond]) / (a * v + 1 - a))


class PaperRule:
    """The paper's guided denoiser, transcribed: σ of the step from ᾱ, D_w in denoised space, then
    back to the ε the sampler takes."""

    def __init__(self, model, w, sigma_lo, sigma_hi):
        self.model, self.w, self.lo, self.hi = model, w, sigma_lo, sigma_hi

    def __call__(self, x_t, t, cond):
        abar = float(ABAR[int(t[0])])
        sigma = math.sqrt((1 - abar) / abar)

        def D(labels):  # the denoiser of the paper: predicted clean sample
            return (x_t - math.sqrt(1 - abar) * self.model(x_t, t, labels).eps) / math.sqrt(abar)

        d_c = D(cond)
        if self.lo < sigma <= self.hi:
            d = self.w * d_c + (1 - self.w) * D(torch.full_like(cond, NULL))
        else:
            d = d_c
        return ModelOutput((x_t - math.sqrt(abar) * d) / math.sqrt(1 - abar))


def _sample(model, sampler="ddpm", n=3, seed=0):
    plan = Plan.from_betas(BETAS, STEPS)
    g = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    x = randn_per_item(g, SHAPE, "cpu")
    return sample(model, x, plan, torch.zeros(n, dtype=torch.long), g, sampler=sampler)


def _mgd3(interval):
    return CFGDenoiser(TwoGaussians(), SCALE, torch.tensor([NULL]), interval=interval, sigmas=noise_levels(BETAS))


def _boundaries():
    """σ_lo and σ_hi exactly at two visited steps' noise levels: the open/closed ends matter."""
    ts = Plan.from_betas(BETAS, STEPS).timesteps
    s = np.sqrt((1 - ABAR[ts]) / ABAR[ts])
    return float(s[5]), float(s[14])  # steps 6..14 (of 0..19) guided: σ_lo excluded, σ_hi included


def test_noise_levels_are_the_vp_sigma():
    s = noise_levels(BETAS)
    assert s.shape == (1000,) and np.all(np.diff(s) > 0)
    assert s[0] == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)))
    assert s[999] == pytest.approx(math.sqrt((1 - ABAR[999]) / ABAR[999]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_interval_is_the_papers_rule(sampler):
    lo, hi = _boundaries()
    ref = _sample(PaperRule(TwoGaussians(), SCALE, lo, hi), sampler)
    got = _sample(_mgd3((lo, hi)), sampler)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # the test can tell the boundary rules apart: each end flipped, or the interval ignored, is far from it
    ts = Plan.from_betas(BETAS, STEPS).timesteps
    s = np.sqrt((1 - ABAR[ts]) / ABAR[ts])
    for wrong in (PaperRule(TwoGaussians(), SCALE, float(s[4]), hi),  # σ_lo included (closed at the low end)
                  PaperRule(TwoGaussians(), SCALE, lo, float(s[13])),  # σ_hi excluded (open at the high end)
                  PaperRule(TwoGaussians(), SCALE, 0.0, 1e9)):  # the interval ignored: CFG at every step
        assert (_sample(wrong, sampler) - ref).abs().max() > 1e-3


def test_guided_steps_are_the_interval():
    lo, hi = _boundaries()
    ts = Plan.from_betas(BETAS, STEPS).timesteps
    on = _mgd3((lo, hi)).guided(torch.as_tensor(ts))
    assert on.tolist() == [False] * 6 + [True] * 9 + [False] * 5
    assert cfg_interval_timesteps(BETAS, ts, (lo, hi)) == [int(t) for t in ts[6:15]]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_interval_over_every_step_is_plain_cfg_bit_for_bit(sampler):
    plain = CFGDenoiser(TwoGaussians(), SCALE, torch.tensor([NULL]))
    assert torch.equal(_sample(_mgd3((0.0, 1e9)), sampler), _sample(plain, sampler))
    # and an interval no step is in is scale 1: the conditional model alone
    assert torch.equal(_sample(_mgd3((1e8, 1e9)), sampler), _sample(TwoGaussians(), sampler))


def test_outside_the_interval_one_forward_without_the_null_class():
    calls = []

    def model(x_t, t, cond):
        calls.append(cond.tolist())
        return TwoGaussians()(x_t, t, cond)

    lo, hi = _boundaries()
    den = CFGDenoiser(model, SCALE, torch.tensor([NULL]), interval=(lo, hi), sigmas=noise_levels(BETAS))
    _sample(den, n=2)
    assert [len(c) for c in calls] == [2] * 5 + [4] * 9 + [2] * 6  # noisiest first
    assert all(NULL not in c for c in calls[:5] + calls[14:])


def test_a_batch_on_both_sides_of_the_interval_guides_each_item_by_its_own_step():
    lo, hi = _boundaries()
    ts = Plan.from_betas(BETAS, STEPS).timesteps
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.as_tensor([ts[10], ts[2]])  # guided, not guided
    out = _mgd3((lo, hi))(x, t, torch.zeros(2, dtype=torch.long)).eps
    plain = CFGDenoiser(TwoGaussians(), SCALE, torch.tensor([NULL]))
    torch.testing.assert_close(out[:1], plain(x[:1], t[:1], torch.zeros(1, dtype=torch.long)).eps)
    torch.testing.assert_close(out[1:], TwoGaussians()(x[1:], t[1:], torch.zeros(1, dtype=torch.long)).eps)


# --------------------------------------------------------------------------- through distill


def _distill(model, out, method, **sampler):
    from mgd3.run.driver import DistillConfig, distill

    distill(DistillConfig(data="digits", out=str(out), model=str(model), method=method, ipc=2, classes=["3", "7"],
                          batch_size=4, progress=False, device="cpu",
                          sampler=SamplerConfig(steps=6, cfg=4.0, **sampler)))
    m = json.loads((out / "manifest.json").read_text())
    return torch.load(out / "latents.pt", weights_only=True)["latents"], m


@pytest.mark.parametrize("method", ["plain", "mgd3", "d4m", "dmgd"])
def test_distill_interval_over_every_step_is_bit_identical(digits_model, tmp_path, method):
    a, _ = _distill(digits_model, tmp_path / "a", method)
    b, m = _distill(digits_model, tmp_path / "b", method, cfg_interval=(0.0, 1e9))
    assert torch.equal(a, b)
    assert m["config"]["sampler"]["cfg_interval"] == [0.0, 1e9]


def test_distill_records_the_interval_and_counts_the_forwards(digits_model, tmp_path):
    from mgd3.backends import load_backend

    backend = load_backend(digits_model)
    ts = Plan.from_betas(backend.betas, 6).timesteps
    s = noise_levels(backend.betas)[ts]
    interval = (float(s[1]), float(s[4]))  # steps 2, 3, 4 of 0..5 guided
    lat, m = _distill(digits_model, tmp_path / "i", "plain", cfg_interval=interval)
    full, m_full = _distill(digits_model, tmp_path / "f", "plain")
    assert m["config"]["sampler"]["cfg_interval"] == list(interval)
    assert m_full["config"]["sampler"]["cfg_interval"] is None
    assert m_full["profile"]["generate"]["forwards"] == 4 * 6 * 2
    assert m["profile"]["generate"]["forwards"] == 4 * (3 * 2 + 3)  # the unconditional rows only where guided
    assert not torch.equal(lat, full)


def test_mgd3_json_recommends_an_interval(digits_model, tmp_path):
    import shutil

    from mgd3.errors import Mgd3Error

    model = tmp_path / "model"
    shutil.copytree(digits_model, model)
    info_file = model / "mgd3.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info["defaults"] = {"cfg": 4.0, "by_ipc": [{"ipc": [2, 2], "cfg_interval": [0.5, 20.0]}]}
    info_file.write_text(json.dumps(info))
    _, m = _distill(model, tmp_path / "rec", "plain")
    assert m["config"]["sampler"]["cfg_interval"] == [0.5, 20.0]
    assert m["recommended"]["taken"]["--cfg-interval"] == [0.5, 20.0]
    _, m = _distill(model, tmp_path / "given", "plain", cfg_interval=(0.0, 1e9))  # the user's wins
    assert m["config"]["sampler"]["cfg_interval"] == [0.0, 1e9] and m["recommended"] is None
    for bad in ([5.0, 1.0], [-1.0, 3.0], [1.0], "wide"):
        info["defaults"]["by_ipc"][0]["cfg_interval"] = bad
        info_file.write_text(json.dumps(info))
        with pytest.raises(Mgd3Error, match="cfg_interval"):
            _distill(model, tmp_path / f"bad{bad!s:.4}", "plain")


@pytest.mark.parametrize("values, words", [(["5", "1"], "--cfg-interval: LOW must be below HIGH, got 5 1"),
                                           (["2", "2"], "--cfg-interval: LOW must be below HIGH, got 2 2"),
                                           (["-1", "3"], "--cfg-interval needs two finite noise levels >= 0"),
                                           (["0", "nan"], "--cfg-interval needs two finite noise levels >= 0")])
def test_bad_interval_is_one_error_line_before_any_model_loads(tmp_path, values, words):
    from conftest import run_cli

    # the model folder does not exist: an error about it would mean the model was looked at first
    r = run_cli("distill", "--data", "digits", "--model", tmp_path / "no-model", "--out", tmp_path / "o",
                "--cfg-interval", *values)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mgd3: error: "), r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_the_interval_is_part_of_the_run_key(digits_model, tmp_path):
    """A re-run with the same interval finds the set complete; another interval is refused."""
    from mgd3.errors import Mgd3Error

    out = tmp_path / "o"
    first, _ = _distill(digits_model, out, "plain", cfg_interval=(0.5, 20.0))
    again, _ = _distill(digits_model, out, "plain", cfg_interval=[0.5, 20.0])  # a list reads back the same
    assert torch.equal(first, again)
    with pytest.raises(Mgd3Error, match="cfg_interval"):
        _distill(digits_model, out, "plain", cfg_interval=(0.5, 10.0))
    with pytest.raises(Mgd3Error, match="cfg_interval"):
        _distill(digits_model, out, "plain")
