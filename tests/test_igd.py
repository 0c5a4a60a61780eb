"""IGD (influence-guided diffusion) against the released code (github.com/mchen725/DD_IGD).

1. The pieces the released code holds, transcribed literally: `get_grads` of `sample.py` (the
   real-gradient memory: batches of 50, flat parameters through a ReparamModule, the gradients
   averaged over the batches), `gm_loss` and the checkpoint selection of
   `test_ckpts_grad_sim.py` (`cos_simf`, threshold 0.7).
2. The sampling loop: DiT's respaced DDPM (`OfficialDiffusion`, tests/test_reference.py) with the
   IGD terms written the released way (flat parameters, `create_graph=True`, `gm_loss` averaged
   over checkpoints, the class memory `pseudo_memory_c` filled batch by batch and cut to
   `memory_size`) and the guided-diffusion step `condition_mean` (mean + variance × gradient of
   log p): the released `diffusion/` package, where IGD's own step lives, is not available, so
   this is the step mgd3 states it takes, transcribed independently of mgd3's code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mgd3.errors import Mgd3Error
from mgd3.evaluation.networks import build_network
from mgd3.methods import SamplerConfig, get_method
from mgd3.methods.igd import (IGDOptions, influence_loss, real_gradient, select_checkpoints)
from test_reference import OfficialDiffusion, gens, items_for, make_ctx
from conftest import distill_args, run_cli

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("module_one_thread")


class ReparamModule(nn.Module):
    """The released surrogate wrapper's contract (MTT's ReparamModule): forward(x, flat_param)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]

    def forward(self, x, flat_param):
        params, at = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s))
            params[n] = flat_param[at:at + k].view(s)
            at += k
        return torch.func.functional_call(self.model, params, (x,))


def _surrogate(channels=3, classes=2, resolution=16, n_ckpts=3, seed=0):
    """A ConvNet-3 and `n_ckpts` parameter sets: the released list-of-tensors form and mgd3's dicts."""
    model = build_network("convnet-3", channels, classes, resolution, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ckpts = []
    for _ in range(n_ckpts):
        ckpts.append([p.detach() + 0.05 * torch.randn(p.shape, generator=g) for p in model.parameters()])
    dicts = [dict(zip([n for n, _ in model.named_parameters()], c)) for c in ckpts]
    return model, ckpts, dicts


def released_get_grads(surrogate, ckpts, grads_memory, correspond_y, grad_ipc):
    """`get_grads` of the released sample.py, from `real_gradients = defaultdict(list)` on."""
    criterion_ce = nn.CrossEntropyLoss()
    gap = 50
    gap_idxs = np.arange(0, grad_ipc, gap).tolist()
    ckpt_grads = []
    for ii, ckpt in enumerate(ckpts):
        for gi in gap_idxs:
            cur_embd0 = torch.stack(grads_memory[gi:gi + gap]).cpu().numpy()
            cur_embds = torch.from_numpy(cur_embd0).squeeze(1).requires_grad_(True)
            cur_params = torch.cat([p.data.reshape(-1) for p in ckpt], 0).requires_grad_(True)
            if gi == 0:
                acc_grad = torch.zeros(cur_params.shape)
            real_pred = surrogate(cur_embds, flat_param=cur_params)
            real_target = torch.tensor(np.array([np.ones(len(cur_embds)) * correspond_y]), dtype=torch.long).view(-1)
            real_loss = criterion_ce(real_pred, real_target)
            real_grad = torch.autograd.grad(real_loss, cur_params)[0]
            acc_grad += real_grad.detach().data.cpu()
        ckpt_grads.append(acc_grad / len(gap_idxs))
    return ckpt_grads


def gm_loss(pg, rg):
    """The released `gm_loss`."""
    inv_gm_dist = torch.sum(
        1 - torch.sum(pg * rg, dim=-1) / (torch.norm(pg, dim=-1) * torch.norm(rg, dim=-1) + 0.000001))
    return inv_gm_dist


def cos_simf(pg, rg):
    """The released `cos_simf` (test_ckpts_grad_sim.py)."""
    inv_gm_dist = torch.sum(pg * rg) / (torch.norm(pg) * torch.norm(rg) + 0.000001)
    return inv_gm_dist


def released_selection(grads_per_ckpt, threshold=0.7):
    """The selection loop of test_ckpts_grad_sim.py, recording the indices it marks."""
    kept = [0]
    comp_idx = 0
    pre_grads = grads_per_ckpt[0]
    for idx in [int(i) for i in range(1, len(grads_per_ckpt))]:
        cls_grad_sim = 0
        cur_grads = grads_per_ckpt[idx]
        for y in pre_grads.keys():
            cls_grad_sim += cos_simf(pre_grads[y], cur_grads[y])
        cls_grad_sim /= len(pre_grads.keys())
        if cls_grad_sim < threshold:
            comp_idx = idx
            pre_grads = cur_grads
            kept.append(comp_idx)
    return kept


@pytest.mark.parametrize("grad_ipc", [80, 50, 7])
def test_real_gradient_matches_released_get_grads(grad_ipc):
    model, ckpts, dicts = _surrogate()
    images = torch.randn(grad_ipc, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = released_get_grads(ReparamModule(model), ckpts, list(images.split(1)), 1, grad_ipc)
    for k, params in enumerate(dicts):
        ours = real_gradient(model, params, images, 1)
        assert torch.allclose(ours, ref[k], rtol=1e-5, atol=1e-7)
    if grad_ipc == 80:  # the released average is over batches (50 and 30), not over images
        by_image = sum(real_gradient(model, dicts[0], images[s:s + 1], 1) for s in range(80)) / 80
        assert (by_image - ref[0]).abs().max() > 1e-4


def test_influence_loss_is_the_released_gm_loss_averaged_over_checkpoints():
    g = torch.Generator().manual_seed(0)
    pseudo = [torch.randn(500, generator=g) for _ in range(4)]
    real = [torch.randn(500, generator=g) for _ in range(4)]
    ref = sum(gm_loss(p, r) for p, r in zip(pseudo, real)) / 4
    assert torch.allclose(influence_loss(pseudo, real), ref, atol=1e-7)


def test_checkpoint_selection_matches_the_released_script():
    g = torch.Generator().manual_seed(0)
    base = {c: torch.randn(200, generator=g) for c in range(3)}
    grads, cur = [], base
    for k in range(12):  # a drift that crosses the threshold now and then
        cur = {c: v + (0.9 if k % 4 == 3 else 0.15) * torch.randn(200, generator=g) for c, v in cur.items()}
        grads.append(cur)
    for threshold in (0.7, 0.9, 0.3):
        assert select_checkpoints(grads, threshold) == released_selection(grads, threshold)
    assert len(released_selection(grads, 0.7)) > 1


# --------------------------------------------------------------------------- the sampling loop


def _cfg_model(transformer, scale, null_class=10, cfg_channels=3):
    """DiT's `forward_with_cfg` with gradients (the released guidance differentiates through it)."""

    def model(x, t, y):
        b = x.shape[0]
        out = transformer(torch.cat([x, x]), timestep=torch.cat([t, t]),
                          class_labels=torch.cat([y, torch.full_like(y, null_class)])).sample.float()
        eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        half = eps[b:] + scale * (eps[:b] - eps[b:])
        return torch.cat([half, rest[:b]], dim=1)

    return model


def released_loop(folder, items, positions, reparam, ckpts, real_grads, *, steps, cfg, low, high, gm_scale,
                  neg_e, memory_size):
    """IGD batch by batch (one item each, as the released sampler), class memory `pseudo_memory_c`."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer", low_cpu_mem_usage=False).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False).eval()
    sf = vae.config.scaling_factor
    diffusion = OfficialDiffusion(steps)
    model = _cfg_model(transformer, cfg)
    criterion = nn.CrossEntropyLoss()
    memories: dict[int, list] = {}
    out_latents = []
    for it, label_idx in zip(items, positions):
        pseudo_memory_c = memories.setdefault(it.cls.index, [])
        g = gens([it])
        x = torch.stack([torch.randn(4, 8, 8, generator=g[0])])
        y = torch.as_tensor([it.cls.label])
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((1,), i, dtype=torch.long)
            with torch.no_grad():
                out = diffusion.p_mean_variance(model, x, t, y)
            mean = out["mean"]
            if low <= diffusion.timestep_map[i] <= high:
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    x0 = diffusion.p_mean_variance(model, x_in, t, y)["pred_xstart"]
                    pseudo_imgs = vae.decode(x0 / sf).sample
                    pseudo_target = torch.tensor(np.array([np.ones(len(pseudo_imgs)) * label_idx]),
                                                 dtype=torch.long).view(-1)
                    total_gm_loss = 0
                    for idx, ckpt in enumerate(ckpts):
                        cur_params = torch.cat([p.data.reshape(-1) for p in ckpt], 0).requires_grad_(True)
                        pseudo_pred = reparam(pseudo_imgs, flat_param=cur_params)
                        pseudo_loss_val = criterion(pseudo_pred, pseudo_target)
                        pseudo_g = torch.autograd.grad(pseudo_loss_val, cur_params, create_graph=True)[0]
                        total_gm_loss += gm_loss(pseudo_g, real_grads[label_idx][idx])
                    total_gm_loss /= len(ckpts)
                    dev = 0.0
                    if pseudo_memory_c:
                        sims = [torch.sum(x0 * m) / (torch.norm(x0) * torch.norm(m) + 0.000001)
                                for m in pseudo_memory_c]
                        dev = torch.stack(sims).max()
                    loss = gm_scale * total_gm_loss + neg_e * dev
                    gradient = -torch.autograd.grad(loss, x_in)[0]  # ∇ log p, log p = −loss
                # guided-diffusion `condition_mean`: mean + variance * gradient
                mean = mean.float() + torch.exp(out["log_variance"]) * gradient.float()
            z = torch.stack([torch.randn(x.shape[1:], generator=gi) for gi in g]) if i > 0 else 0.0
            x = (mean + float(i != 0) * torch.exp(0.5 * out["log_variance"]) * z).detach()
        out_latents.append(x)
        pseudo_memory_c.extend(x.detach().split(1))
        while len(pseudo_memory_c) > memory_size:
            pseudo_memory_c.pop(0)
    return torch.cat(out_latents)


def mgd3_igd(dit, items, positions, model, dicts, real_grads, *, steps, cfg, low, high, rho, gamma, memory_size):
    """mgd3's `igd` method with its surrogate given (training and gradients are tested above)."""
    cls = get_method("igd")
    method = cls(IGDOptions(influence_scale=rho, deviation_scale=gamma, igd_low=low, igd_high=high,
                            memory_size=memory_size))
    ctx = make_ctx(dit, items, SamplerConfig(steps=steps, cfg=cfg, cfg_channels=3))
    method.validate(ctx)
    method.surrogate, method.checkpoints = model, dicts
    method.real = {p: real_grads[p] for p in set(positions)}
    method.position = {it.cls.index: p for it, p in zip(items, positions)}
    method.memory = {it.cls.index: torch.zeros(0, int(np.prod(dit.latent_shape))) for it in items}
    return torch.cat([method.generate(ctx, [it]).latents for it in items])  # batch 1, in order


@pytest.fixture(scope="module")
def igd_case(dit):
    model, ckpts, dicts = _surrogate(n_ckpts=2)
    g = torch.Generator().manual_seed(5)
    reals = {p: [torch.randn(sum(t.numel() for t in ckpts[0]), generator=g) for _ in ckpts] for p in (0, 1)}
    items = items_for([3, 8], ipc=3)
    positions = [0 if it.cls.label == 3 else 1 for it in items]
    return model, ckpts, dicts, reals, items, positions


SETTINGS = dict(steps=10, cfg=4.0, low=300, high=800, memory_size=2)


@pytest.mark.parametrize("rho,gamma", [(30.0, 0.0), (0.0, 3.0), (30.0, 3.0)])
def test_igd_loop_matches_the_released_terms_with_condition_mean(dit, dit_folder, igd_case, rho, gamma):
    model, ckpts, dicts, reals, items, positions = igd_case
    ours = mgd3_igd(dit, items, positions, model, dicts, reals, rho=rho, gamma=gamma, **SETTINGS)
    ref = released_loop(dit_folder, items, positions, ReparamModule(model), ckpts, reals, gm_scale=rho,
                        neg_e=gamma, **SETTINGS)
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs latent difference {err:.2e}"
    plain = released_loop(dit_folder, items, positions, ReparamModule(model), ckpts, reals, gm_scale=0.0,
                          neg_e=0.0, **SETTINGS)
    assert (plain - ref).abs().max().item() > 1e-3  # the guidance did something, so matching it means something


def test_the_window_and_the_memory_size_change_the_released_loop(dit_folder, igd_case):
    """The reference differs where mgd3's options differ: no test above passes vacuously."""
    model, ckpts, _, reals, items, positions = igd_case
    base = dict(SETTINGS, gm_scale=30.0, neg_e=3.0)
    a = released_loop(dit_folder, items, positions, ReparamModule(model), ckpts, reals, **base)
    b = released_loop(dit_folder, items, positions, ReparamModule(model), ckpts, reals, **dict(base, low=400))
    c = released_loop(dit_folder, items, positions, ReparamModule(model), ckpts, reals, **dict(base, memory_size=1))
    assert (a - b).abs().max().item() > 1e-4
    assert (a - c).abs().max().item() > 1e-4


# --------------------------------------------------------------------------- the command


def test_options_are_checked_before_any_model_loads(tmp_path):
    for args, words in ((["--igd-low", "900", "--igd-high", "500"], "--igd-low and --igd-high"),
                        (["--surrogate-epochs", "0"], "--surrogate-epochs must be at least 1"),
                        (["--checkpoint-threshold", "2"], "--checkpoint-threshold is a cosine"),
                        (["--influence-scale", "nan"], "--influence-scale"),
                        (["--no-cache"], "drop --no-cache")):
        r = run_cli("distill", "--data", "digits", "--method", "igd", "--ipc", "1", "--model", tmp_path / "absent",
                    "--out", tmp_path / "out", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mgd3: error:") and words in lines[0], r.stderr
        assert not (tmp_path / "out").exists()
    with pytest.raises(Mgd3Error, match="--grad-ipc"):
        IGDOptions(grad_ipc=0)


def test_distill_igd_end_to_end_caches_and_resumes_the_surrogate(digits_model, tmp_path, caplog):
    from mgd3.cli import main

    cache = tmp_path / "cache"
    small = ["--method", "igd", "--surrogate-per-class", "12", "--grad-ipc", "8", "--igd-low", "0",
             "--igd-high", "999", "--influence-scale", "5", "--cache-dir", str(cache)]
    assert main(distill_args(str(digits_model), str(tmp_path / "a"), *small, "--surrogate-epochs", "1")) == 0
    info = json.loads((tmp_path / "a" / "manifest.json").read_text())["method_info"]
    assert info["training_free"] is False and info["surrogate_trained"] is True
    assert info["surrogate"]["epochs_from_cache"] == 0 and info["checkpoints_kept"][0] == 0
    files = sorted(cache.glob("surrogates/*/epoch-*.pt"))
    assert [f.name for f in files] == ["epoch-001.pt"]
    # a longer surrogate is another cache entry; the same one again reads every epoch back
    assert main(distill_args(str(digits_model), str(tmp_path / "b"), *small, "--surrogate-epochs", "1")) == 0
    info_b = json.loads((tmp_path / "b" / "manifest.json").read_text())["method_info"]
    assert info_b["surrogate"]["epochs_from_cache"] == 1
    a = (tmp_path / "a" / "images").rglob("*.png")
    assert [p.read_bytes() for p in sorted(a)] == [p.read_bytes() for p in sorted((tmp_path / "b" / "images").rglob("*.png"))]
    # a cache file that is not plain tensors is refused (weights_only), warned about and trained again
    files[0].write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    caplog.clear()
    assert main(distill_args(str(digits_model), str(tmp_path / "c"), *small, "--surrogate-epochs", "1")) == 0
    assert "unusable" in caplog.text
    info_c = json.loads((tmp_path / "c" / "manifest.json").read_text())["method_info"]
    assert info_c["surrogate"]["epochs_from_cache"] == 0


def test_igd_resumes_the_surrogate_from_its_last_epoch(digits_model, tmp_path):
    from mgd3.cli import main

    cache = tmp_path / "cache"
    small = ["--method", "igd", "--surrogate-per-class", "12", "--grad-ipc", "8", "--cache-dir", str(cache),
             "--surrogate-epochs", "2"]
    assert main(distill_args(str(digits_model), str(tmp_path / "full"), *small)) == 0
    full = {f.name: torch.load(f, weights_only=True)["params"] for f in cache.glob("surrogates/*/epoch-*.pt")}
    (next(cache.glob("surrogates/*/epoch-002.pt"))).unlink()  # as if killed during epoch 2
    assert main(distill_args(str(digits_model), str(tmp_path / "resumed"), *small)) == 0
    info = json.loads((tmp_path / "resumed" / "manifest.json").read_text())["method_info"]
    assert info["surrogate"]["epochs_from_cache"] == 1
    again = torch.load(next(cache.glob("surrogates/*/epoch-002.pt")), weights_only=True)["params"]
    for k, v in full["epoch-002.pt"].items():
        assert torch.equal(v, again[k]), k  # the resumed epoch equals the uninterrupted one


def test_a_batch_of_classes_gives_each_item_its_own_result(dit, igd_case):
    """Each item of a batch is guided by its own class's gradients: a batch of both classes equals
    the items sampled one by one (the deviation term off: its memory is what batching changes)."""
    model, _, dicts, reals, items, positions = igd_case
    settings = dict(SETTINGS, rho=30.0, gamma=0.0)
    one_by_one = mgd3_igd(dit, items, positions, model, dicts, reals, **settings)
    cls = get_method("igd")
    method = cls(IGDOptions(influence_scale=30.0, deviation_scale=0.0, igd_low=300, igd_high=800))
    ctx = make_ctx(dit, items, SamplerConfig(steps=10, cfg=4.0, cfg_channels=3))
    method.validate(ctx)
    method.surrogate, method.checkpoints, method.real = model, dicts, reals
    method.position = {it.cls.index: p for it, p in zip(items, positions)}
    method.memory = {it.cls.index: torch.zeros(0, int(np.prod(dit.latent_shape))) for it in items}
    mixed = [items[0], items[3], items[1], items[4]]  # classes 3, 8, 3, 8 in one batch
    batch = method.generate(ctx, mixed).latents
    ref = one_by_one[[0, 3, 1, 4]]
    assert (batch - ref).abs().max().item() <= 1e-4


def _igd_mgd3(dit, items, positions, model, dicts, reals, modes, *, lam, rho, gamma, t_stop=5, batched=False):
    from types import SimpleNamespace

    cls = get_method("igd-mgd3")
    opts = cls.Options(influence_scale=rho, deviation_scale=gamma, igd_low=300, igd_high=800, lam=lam, t_stop=t_stop)
    method = cls(opts)
    ctx = make_ctx(dit, items, SamplerConfig(steps=10, cfg=4.0, cfg_channels=3))
    ctx.check_class_sizes = lambda: None  # no real data: the modes are given
    method.validate(ctx)
    method.surrogate, method.checkpoints, method.real = model, dicts, reals
    method.position = {it.cls.index: p for it, p in zip(items, positions)}
    method.memory = {it.cls.index: torch.zeros(0, int(np.prod(dit.latent_shape))) for it in items}
    by_class: dict[int, list] = {}
    for it, m in zip(items, modes):
        by_class.setdefault(it.cls.index, []).append(m.reshape(-1).numpy())
    method.class_modes = {c: SimpleNamespace(points=np.stack(v), info={}) for c, v in by_class.items()}
    if batched:
        return method.generate(ctx, items).latents
    return torch.cat([method.generate(ctx, [it]).latents for it in items])


def test_igd_mgd3_is_mgd3_without_igd_and_igd_without_modes(dit, igd_case):
    from test_reference import random_modes, run_mgd3_method

    model, _, dicts, reals, items, positions = igd_case
    modes = random_modes(len(items), dit.latent_shape)
    both_off = _igd_mgd3(dit, items, positions, model, dicts, reals, modes, lam=0.1, rho=0.0, gamma=0.0,
                         batched=True)
    mgd3 = run_mgd3_method(dit, items, modes, SamplerConfig(steps=10, cfg=4.0, cfg_channels=3), lam=0.1, t_stop=5)
    assert torch.equal(both_off, mgd3)
    no_modes = _igd_mgd3(dit, items, positions, model, dicts, reals, modes, lam=0.0, rho=30.0, gamma=3.0)
    igd = mgd3_igd(dit, items, positions, model, dicts, reals, rho=30.0, gamma=3.0, **SETTINGS)
    assert (no_modes - igd).abs().max().item() <= 1e-6
    both = _igd_mgd3(dit, items, positions, model, dicts, reals, modes, lam=0.1, rho=30.0, gamma=3.0)
    assert (both - igd).abs().max().item() > 1e-3 and (both - mgd3).abs().max().item() > 1e-3
