"""Exact tests of the sampler and mode guidance on analytic denoisers (no weights)."""

import math

import numpy as np
import pytest
import torch

from mgd3.core.guidance import ModeGuidance, StopWindow
from mgd3.core.sampling import CFGDenoiser, ModelOutput, Plan, ddpm_update, randn_per_item, respaced_timesteps, sample

BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)
SHAPE = (4, 3, 3)


class PointMass:
    """The exact ε of data concentrated at c: ε = (x_t - sqrt(ᾱ_t)·c) / sqrt(1 - ᾱ_t)."""

    def __init__(self, c):
        self.c = c

    def __call__(self, x_t, t, cond):
        a = torch.as_tensor(ABAR[t.numpy()], dtype=x_t.dtype).view(-1, 1, 1, 1)
        return ModelOutput((x_t - a.sqrt() * self.c) / (1 - a).sqrt())


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def run(model, sampler, guidance=(), n=3, steps=50, seed=0):
    plan = Plan.from_betas(BETAS, steps)
    g = gens(n, seed)
    x = randn_per_item(g, SHAPE, "cpu")
    return sample(model, x, plan, torch.zeros(n, dtype=torch.long), g, sampler=sampler, guidance=guidance)


def test_respaced_timesteps_match_dit_spacing():
    ts = respaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999
    assert ts[:4] == [0, 20, 41, 61]
    assert ts == [round(k * 999 / 49) for k in range(50)]
    assert respaced_timesteps(1000, 1000) == list(range(1000))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_point_mass_sampling_returns_the_point(sampler):
    c = torch.linspace(-1, 1, math.prod(SHAPE)).view(1, *SHAPE)
    out = run(PointMass(c), sampler)
    torch.testing.assert_close(out, c.expand_as(out), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_mode_guidance_scale_one_over_every_step_returns_the_mode(sampler):
    c = torch.zeros(1, *SHAPE)
    modes = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5))
    guide = StopWindow(ModeGuidance(modes, 1.0, form="x0"), t_stop=-1)
    out = run(PointMass(c), sampler, [guide])
    torch.testing.assert_close(out, modes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("form", ["auto", "ddim", "x0"])
def test_guidance_outside_its_window_is_a_no_op(sampler, form):
    c = torch.full((1, *SHAPE), 0.3)
    modes = torch.randn(3, *SHAPE)
    plain = run(PointMass(c), sampler)
    guided = run(PointMass(c), sampler, [StopWindow(ModeGuidance(modes, 0.5, form), t_stop=49)])
    assert torch.equal(plain, guided)
    moved = run(PointMass(c), sampler, [StopWindow(ModeGuidance(modes, 0.5, form), t_stop=10)])
    assert not torch.equal(plain, moved)


def test_stop_window_counts_steps_like_the_paper():
    w = StopWindow(lambda s: s.mean, t_stop=25)
    assert sum(w.active(i) for i in range(50)) == 24
    assert [i for i in range(50) if w.active(i)] == list(range(26, 50))


def test_ddpm_step_matches_closed_form_posterior():
    plan = Plan.from_betas(BETAS, 50)
    i = 17
    t, tp = plan.timesteps[i], plan.timesteps[i - 1]
    a, ap = ABAR[t], ABAR[tp]
    beta = 1 - a / ap
    x_t, x0 = torch.randn(2, *SHAPE, dtype=torch.float64), torch.randn(2, *SHAPE, dtype=torch.float64)
    eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    mean, sigma, _ = ddpm_update(plan, i, x_t, ModelOutput(eps))
    mu = math.sqrt(ap) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - ap) / (1 - a) * x_t
    torch.testing.assert_close(mean, mu, atol=1e-10, rtol=0)
    assert sigma == pytest.approx(math.sqrt(beta * (1 - ap) / (1 - a)), rel=1e-12)
    # learned range: v = +1 -> beta, v = -1 -> posterior variance
    ones = torch.ones_like(x_t)
    _, s_hi, _ = ddpm_update(plan, i, x_t, ModelOutput(eps, ones))
    _, s_lo, _ = ddpm_update(plan, i, x_t, ModelOutput(eps, -ones))
    torch.testing.assert_close(s_hi**2, torch.full_like(s_hi, beta).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(s_lo**2, torch.full_like(s_lo, beta * (1 - ap) / (1 - a)).float(), rtol=1e-5, atol=0)
    # the last step adds no noise
    assert ddpm_update(plan, 0, x_t, ModelOutput(eps, ones))[1] == 0.0


def _step(update, i, dtype=torch.float32):
    """A Step of a point-mass model at respaced index i, and a random mode per item."""
    from mgd3.core.sampling import Step, predict_x0

    plan = Plan.from_betas(BETAS, 50)
    x_t, c, m = (torch.randn(2, *SHAPE, dtype=dtype), torch.randn(1, *SHAPE, dtype=dtype),
                 torch.randn(2, *SHAPE, dtype=dtype))
    out = PointMass(c)(x_t, torch.full((2,), int(plan.timesteps[i])), None)
    mean, sigma, mfe = update(plan, i, x_t, out)
    a = float(plan.alpha_bar[i])
    step = Step(i, int(plan.timesteps[i]), x_t, out.eps, predict_x0(x_t, out.eps, a), a,
                float(plan.alpha_bar_prev[i]), sigma, mean, "ddpm" if update is ddpm_update else "ddim", mfe)
    return step, m


def test_ddpm_form_adds_lambda_sigma_g():
    step, m = _step(ddpm_update, 30)
    got = ModeGuidance(m, 0.3, "ddpm")(step)
    torch.testing.assert_close(got - step.mean, 0.3 * step.sigma * (m - step.x0), atol=1e-6, rtol=0)


def test_ddim_form_is_paper_eq6():
    from mgd3.core.sampling import ddim_update

    lam = 0.2
    step, m = _step(ddim_update, 30, torch.float64)
    got = ModeGuidance(m, lam, "ddim")(step)
    a, ap = step.alpha_bar, step.alpha_bar_prev
    eps_hat = step.eps - math.sqrt(1 - a) * lam * (m - step.x0)
    x0_hat = (step.x_t - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
    torch.testing.assert_close(got, math.sqrt(ap) * x0_hat + math.sqrt(1 - ap) * eps_hat, atol=1e-10, rtol=0)


class Toy:
    """A nonlinear, label-dependent denoiser with learned-range variance; counts its calls."""

    calls = 0

    def __call__(self, x_t, t, cond):
        Toy.calls += 1
        lab = cond.float().view(-1, 1, 1, 1)
        eps = torch.tanh(x_t * 0.7 + lab * 0.1) + 0.01 * t.float().view(-1, 1, 1, 1) / 1000
        return ModelOutput(eps, torch.tanh(x_t))


def test_cfg_scale_one_is_the_inner_model():
    x, t, y = torch.randn(3, *SHAPE), torch.full((3,), 500), torch.tensor([1, 2, 3])
    Toy.calls = 0
    a = CFGDenoiser(Toy(), 1.0, torch.tensor([9]))(x, t, y)
    assert Toy.calls == 1
    b = Toy()(x, t, y)
    assert torch.equal(a.eps, b.eps) and torch.equal(a.var_values, b.var_values)


def test_cfg_formula_and_channel_quirk():
    x, t, y = torch.randn(3, *SHAPE), torch.full((3,), 500), torch.tensor([1, 2, 3])
    toy = Toy()
    ec, eu = toy(x, t, y).eps, toy(x, t, torch.full((3,), 9)).eps
    out = CFGDenoiser(toy, 4.0, torch.tensor([9]))(x, t, y)
    torch.testing.assert_close(out.eps, eu + 4.0 * (ec - eu))
    q = CFGDenoiser(toy, 4.0, torch.tensor([9]), channels=3)(x, t, y)
    torch.testing.assert_close(q.eps[:, :3], (eu + 4.0 * (ec - eu))[:, :3])
    assert torch.equal(q.eps[:, 3:], ec[:, 3:])  # the DiT quirk: channel 4 keeps the conditional ε
    assert torch.equal(q.var_values, toy(x, t, y).var_values)  # variance from the conditional half


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_batch_equals_one_by_one(sampler):
    plan = Plan.from_betas(BETAS, 10)
    model = CFGDenoiser(Toy(), 2.0, torch.tensor([9]))
    y = torch.tensor([0, 1, 2, 3])
    seeds = [11, 12, 13, 14]
    g = [torch.Generator().manual_seed(s) for s in seeds]
    batch = sample(model, randn_per_item(g, SHAPE, "cpu"), plan, y, g, sampler=sampler, eta=0.5)
    for j, s in enumerate(seeds):
        g1 = [torch.Generator().manual_seed(s)]
        one = sample(model, randn_per_item(g1, SHAPE, "cpu"), plan, y[j:j + 1], g1, sampler=sampler, eta=0.5)
        assert torch.equal(one[0], batch[j])


def test_auto_guidance_form_is_the_update_rules_property():
    """"auto" follows what the rule declares (not the sampler's name): a rule registered under
    any name that declares "ddim" gets the Eq. 6 form; DDPM's own rule declares "ddpm"."""
    from mgd3.core.sampling import UPDATE_RULES, UpdateRule, ddim_update

    assert UPDATE_RULES.get("ddpm").guidance_form == "ddpm" and UPDATE_RULES.get("ddim").guidance_form == "ddim"
    assert not UPDATE_RULES.get("ddpm").takes_eta and UPDATE_RULES.get("ddim").takes_eta
    c = torch.full((1, *SHAPE), 0.3)
    modes = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    guide = StopWindow(ModeGuidance(modes, 0.5, "auto"), t_stop=10)
    UPDATE_RULES.add("ddim-under-another-name", UpdateRule(ddim_update, guidance_form="ddim", takes_eta=True))
    try:
        renamed = run(PointMass(c), "ddim-under-another-name", [guide])
    finally:
        del UPDATE_RULES._items["ddim-under-another-name"]
    eq6 = run(PointMass(c), "ddim", [StopWindow(ModeGuidance(modes, 0.5, "ddim"), t_stop=10)])
    assert torch.equal(renamed, eq6)
