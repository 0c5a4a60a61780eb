"""ManifoldGD against its released code (github.com/AyushRoy2001/ManifoldGD), on the tiny saved DiT.

1. The sampling loop: `OfficialManifoldGD` below transcribes `p_sample_with_mode_guidance`,
   `ddim_sample_with_mode_guidance`, `distribution_aware_guidance`, `get_noisy_manifold`,
   `_adaptive_radius` and `_kernel_phi` of the released `diffusion/gaussian_diffusion.py` literally
   (their names, their order), on the ADM respaced diffusion of tests/test_reference.py. The one
   change: the released code draws the cloud from the global torch RNG; here each item's cloud
   generator (mgd3's) is passed in, so both sides see the same numbers.
2. The modes: a literal transcription of `_build_divisive_tree_k2` + `_pick_ipc_leaves_by_levels`
   (`sample_new.py`) gives mgd3's modes exactly, and the leaves equal scikit-learn's
   `BisectingKMeans(bisecting_strategy="biggest_inertia")` on separated clusters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch as th

from mgd3.errors import Mgd3Error
from mgd3.methods import SamplerConfig, get_method
from mgd3.methods.manifoldgd import ManifoldGDOptions, cloud_generators
from mgd3.core.mode_discovery import divisive_modes
from test_reference import (OfficialDiffusion, generate_with_modes, gens, items_for, make_ctx, official_forward_with_cfg,
                            random_modes)

# float32 arithmetic in another order (float64 coefficients in mgd3, SVD instead of the D×D
# eigendecomposition for the tangent plane) changes the last bits of each of 50 steps
TOL = 1e-5

# `dit_folder`, `dit` and `raw_transformer` (tests/conftest.py): the tiny learned-sigma reference DiT
pytestmark = pytest.mark.usefixtures("module_one_thread")


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res + th.zeros(broadcast_shape, device=timesteps.device)


class OfficialManifoldGD(OfficialDiffusion):
    """The released ManifoldGD guidance, item by item (batch 1, as the released sampler runs)."""

    def __init__(self, num_steps: int, cloud_generator):
        super().__init__(num_steps)
        self.alphas_cumprod = self.acp
        self.alphas_cumprod_prev = self.acp_prev
        self.gen = cloud_generator  # replaces the global RNG of get_noisy_manifold

    def _kernel_phi(self, diff, kernel="rbf", sigma=1.0, imq_c=1.0, eps=1e-8):
        flat = diff.view(diff.shape[0], -1)
        r = torch.norm(flat, dim=1, keepdim=True)
        phi = -1.0 / (sigma ** 2 + eps)
        phi = torch.full_like(r, phi)
        return phi.view(-1, 1, 1, 1)  # (the released code broadcasts it against (1, C, h, w))

    def _adaptive_radius(self, t_scalar, base_radius, stop_t, max_mult=2.0, schedule="linear", warm_steps=10):
        if t_scalar <= stop_t or max_mult <= 1.0:
            return float(base_radius)
        t_hi = self.num_timesteps - 1
        t_cut = max(stop_t, t_hi - warm_steps)
        if t_scalar <= t_cut:
            return float(base_radius)
        span = max(1, t_hi - t_cut)
        p = (t_scalar - t_cut) / span
        p = min(max(p, 0.0), 1.0)
        if schedule == "linear":
            s = p
        elif schedule == "cosine":
            s = 0.5 * (1.0 + math.cos(math.pi * (1.0 - p)))
        elif schedule == "exp":
            s = (math.exp(p) - 1.0) / (math.e - 1.0)
        else:
            s = p
        return float(base_radius * (1.0 + (max_mult - 1.0) * s))

    def get_noisy_manifold(self, ipc_center, t, radius):
        batch_size = ipc_center.shape[0]
        num_manifold_samples = 300
        ipc_flat = ipc_center.view(batch_size, -1)
        noise_dir = torch.randn(num_manifold_samples, ipc_flat.shape[-1], generator=self.gen)
        noise_dir = noise_dir / torch.norm(noise_dir, dim=-1, keepdim=True)
        radii = torch.linspace(0.1, radius, num_manifold_samples // 2)
        radii = torch.cat([radii, torch.rand(num_manifold_samples // 2, generator=self.gen) * radius])
        manifold_samples_flat = ipc_flat + radii.unsqueeze(1) * noise_dir[:len(radii)]
        manifold_samples = manifold_samples_flat.view(len(radii), *ipc_center.shape[1:])
        t_manifold = t[0].repeat(len(radii))
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t_manifold, manifold_samples.shape)
        noise = torch.randn(manifold_samples.shape, generator=self.gen)  # randn_like
        noisy_manifold_samples = (manifold_samples * torch.sqrt(alpha_bar) + torch.sqrt(1 - alpha_bar) * noise)
        return noisy_manifold_samples

    def distribution_aware_guidance(self, x_t, t, ipc_center, radius, guidance_scale, bandwidth=0.1, tangent_dim=1,
                                    k_neighbors=12, ridge=1e-5, stop_t=0, radius_max_mult=2.0,
                                    radius_schedule="linear", warm_steps=10):
        t_now = int(t[0].item())
        eff_radius = self._adaptive_radius(t_scalar=t_now, base_radius=float(radius), stop_t=int(stop_t),
                                           max_mult=float(radius_max_mult), schedule=str(radius_schedule),
                                           warm_steps=int(warm_steps))
        x_t_cond = x_t  # batch 1 after CFG (the released code takes the conditional half)
        x_t_cond_flat = x_t_cond.view(x_t_cond.shape[0], -1)
        manifold_samples = self.get_noisy_manifold(ipc_center, t[:1], eff_radius)
        manifold_flat = manifold_samples.view(manifold_samples.shape[0], -1)
        guidance_terms = []
        K = min(k_neighbors, manifold_flat.shape[0])
        for i in range(x_t_cond_flat.shape[0]):
            x_single = x_t_cond_flat[i:i + 1]
            distances = torch.cdist(x_single, manifold_flat)
            _, idx = torch.topk(distances, K, largest=False, dim=1)
            neigh = manifold_flat[idx.squeeze(0)]
            μ = neigh.mean(dim=0, keepdim=True)
            centered = neigh - μ
            cov = centered.T @ centered / (K - 1)
            cov = cov + ridge * torch.eye(cov.shape[0])
            e, V = torch.linalg.eigh(cov)
            order = torch.argsort(e, descending=True)
            V = V[:, order]
            d = min(int(tangent_dim), V.shape[1])
            U = V[:, :d]
            to_mu = x_single - μ
            proj_tan = to_mu @ U @ U.T
            normal_comp = to_mu - proj_tan
            manifold_vec = -normal_comp
            norm = torch.norm(manifold_vec, dim=-1, keepdim=True)
            direction = manifold_vec / (norm + 1e-8)
            min_dist, _ = torch.min(distances, dim=1)
            distance_weight = torch.tanh(min_dist / bandwidth)
            guidance_terms.append((guidance_scale * distance_weight * direction).view_as(x_t_cond[i:i + 1]))
        return guidance_terms[0]

    def p_sample_with_mode_guidance(self, model, x, t, y, z, mode_features, stop_t, mode_guidance_scale, g):
        out = self.p_mean_variance(model, x, t, y)
        noise = z
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        xstart = out["pred_xstart"]
        if t[0].item() > stop_t and mode_features is not None:
            diff = xstart - mode_features
            phi = self._kernel_phi(diff, kernel="rbf", sigma=1.0, imq_c=1.0)
            mode_guidance_term = (phi * diff) * mode_guidance_scale * th.exp(0.5 * out["log_variance"])
        else:
            mode_guidance_term = 0
        if t[0].item() > stop_t and g["manifold_guidance_scale"] > 0:
            distribution_guidance_term = self.distribution_aware_guidance(
                x, t, mode_features, radius=g["manifold_radius"], guidance_scale=g["manifold_guidance_scale"],
                bandwidth=g["density_bandwidth"], tangent_dim=g["tangent_dim"], stop_t=stop_t,
                radius_max_mult=g["radius_max_mult"], radius_schedule=g["radius_schedule"],
                warm_steps=g["radius_warm_steps"])
        else:
            distribution_guidance_term = 0
        total_guidance = mode_guidance_term + distribution_guidance_term
        sample = out["mean"] + total_guidance + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_with_mode_guidance(self, model, x, t, y, mode_features, stop_t, mode_guidance_scale, g):
        out = self.p_mean_variance(model, x, t, y)
        if t[0].item() > stop_t and mode_features is not None:
            xstart = out["pred_xstart"]
            mode_guidance_term = - (xstart - mode_features) * mode_guidance_scale
            out["pred_xstart"] = out["pred_xstart"] + mode_guidance_term
        if t[0].item() > stop_t and g["manifold_guidance_scale"] > 0 and mode_features is not None:
            distribution_guidance_term = self.distribution_aware_guidance(
                x, t, mode_features, radius=g["manifold_radius"], guidance_scale=g["manifold_guidance_scale"],
                bandwidth=g["density_bandwidth"], tangent_dim=g["tangent_dim"], stop_t=stop_t,
                radius_max_mult=g["radius_max_mult"], radius_schedule=g["radius_schedule"],
                warm_steps=g["radius_warm_steps"])
            out["pred_xstart"] = out["pred_xstart"] + distribution_guidance_term
        eps = (_extract_into_tensor(self.sqrt_recip_acp, t, x.shape) * x - out["pred_xstart"]) / \
            _extract_into_tensor(self.sqrt_recipm1_acp, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev) * eps  # eta 0
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}


GUIDE = dict(manifold_guidance_scale=0.1, manifold_radius=0.1, density_bandwidth=0.2, tangent_dim=3,
             radius_max_mult=2.0, radius_schedule="exp", radius_warm_steps=5)


def oracle(raw_transformer, items, modes, *, sampler, stop_t, lam=0.1, steps=50, cfg=4.0, **guide):
    g = {**GUIDE, **guide}
    model = official_forward_with_cfg(raw_transformer, cfg, 10)
    out = []
    for it, gen, cloud_gen, mode in zip(items, gens(items), cloud_generators(items), modes):
        diffusion = OfficialManifoldGD(steps, cloud_gen)
        x = torch.randn(mode.shape, generator=gen)[None]  # (1, C, h, w) the item's first draw
        y = torch.as_tensor([it.cls.label])
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((1,), i, dtype=torch.long)
            if sampler == "ddpm":
                z = torch.randn(mode.shape, generator=gen)[None] if i > 0 else torch.zeros_like(x)
                x = diffusion.p_sample_with_mode_guidance(model, x, t, y, z, mode[None], stop_t, lam, g)["sample"]
            else:
                x = diffusion.ddim_sample_with_mode_guidance(model, x, t, y, mode[None], stop_t, lam, g)["sample"]
        out.append(x)
    return torch.cat(out)


def ours(backend, items, modes, *, sampler, stop_t, lam=0.1, steps=50, cfg=4.0, **options):
    cls = get_method("manifoldgd")
    method = cls(cls.Options(mode_guidance_scale=lam, t_stop=stop_t, **options))
    ctx = make_ctx(backend, items, SamplerConfig(sampler=sampler, steps=steps, cfg=cfg, cfg_channels=3))
    return generate_with_modes(method, ctx, items, modes)


@pytest.mark.parametrize("sampler,stop_t", [("ddpm", 25), ("ddpm", 0), ("ddim", 25)])
def test_manifoldgd_matches_the_released_loop(dit, raw_transformer, sampler, stop_t):
    """mgd3 `manifoldgd` (released defaults: λ 0.1, η 0.1, tangent dim 3, radius 0.1, bandwidth 0.2,
    warm-up 5 steps ×2 exp; CFG 4 on 3 channels, 50 steps) == the literal released loop, ≤ 1e-5;
    and the manifold term changes the result by far more than that. stop_t 0 is the released
    default (every step but the last); at the last step σ = 0 in mgd3, so --t-stop -1 adds no mode
    term there, where the released code, given --stop_t -1 (no script does), would add one scaled
    by the clipped posterior std."""
    items = items_for([3, 8], ipc=2)
    modes = random_modes(len(items), dit.latent_shape)
    a = ours(dit, items, modes, sampler=sampler, stop_t=stop_t)
    ref = oracle(raw_transformer, items, modes, sampler=sampler, stop_t=stop_t)
    err = (a - ref).abs().max().item()
    assert err <= TOL, f"max abs latent difference {err:.2e}"
    no_manifold = oracle(raw_transformer, items, modes, sampler=sampler, stop_t=stop_t, manifold_guidance_scale=0.0)
    assert (no_manifold - ref).abs().max().item() > 1e-2


def test_manifoldgd_options_change_the_released_loop_as_ours(dit, raw_transformer):
    """Other tangent dimension, radius schedule and scales: still the released loop, ≤ 1e-5."""
    items = items_for([1], ipc=2)
    modes = random_modes(len(items), dit.latent_shape, seed=11)
    kw = dict(tangent_dim=1, radius_schedule="cosine", manifold_radius=0.3, radius_warm_steps=10,
              density_bandwidth=0.1, manifold_guidance_scale=0.3)
    a = ours(dit, items, modes, sampler="ddpm", stop_t=20, lam=0.2, **kw)
    ref = oracle(raw_transformer, items, modes, sampler="ddpm", stop_t=20, lam=0.2, **kw)
    assert (a - ref).abs().max().item() <= TOL
    default = oracle(raw_transformer, items, modes, sampler="ddpm", stop_t=20, lam=0.2)
    assert (default - ref).abs().max().item() > 1e-2


# --------------------------------------------------------------------------- modes


def released_divisive_layer(X, IPC, random_state=0, criterion="sse", level_i=2):
    """`divisive_bisect_kmeans_ipc_l2_select_by_levels` (return_mode centroid), literally."""
    from sklearn.cluster import KMeans

    X2 = X.reshape(X.shape[0], -1)
    rng = np.random.RandomState(random_state)
    rng_tree = np.random.RandomState(random_state)

    def _sse(idx):
        if len(idx) <= 1:
            return 0.0
        mu = X2[idx].mean(axis=0, keepdims=True)
        return float(((X2[idx] - mu) ** 2).sum())

    def _var(idx):
        if len(idx) <= 1:
            return 0.0
        return float(np.var(X2[idx]))

    score_fn = _sse if criterion == "sse" else _var
    nodes = {}
    next_id = 0

    def new_node(idx, parent=None, depth=0):
        nonlocal next_id
        nid = next_id
        next_id += 1
        nodes[nid] = {"idx": np.asarray(idx, dtype=int), "left": None, "right": None, "parent": parent,
                      "depth": depth}
        return nid

    root = new_node(np.arange(X2.shape[0]), parent=None, depth=0)
    leaves = [root]
    while len(leaves) < IPC:
        scores = [score_fn(nodes[n]["idx"]) for n in leaves]
        ci = int(np.argmax(scores))
        nid = leaves.pop(ci)
        idx = nodes[nid]["idx"]
        if len(idx) <= 1:
            leaves.append(nid)
            if all(len(nodes[n]["idx"]) <= 1 for n in leaves):
                break
            continue
        km = KMeans(n_clusters=2, n_init=10, random_state=rng_tree.randint(1 << 31))
        sub = km.fit_predict(X2[idx])
        left_idx = idx[sub == 0]
        right_idx = idx[sub == 1]
        if len(left_idx) == 0 or len(right_idx) == 0:
            rng_tree.shuffle(idx)
            mid = len(idx) // 2
            left_idx, right_idx = idx[:mid], idx[mid:]
        d = nodes[nid]["depth"]
        L = new_node(left_idx, parent=nid, depth=d + 1)
        R = new_node(right_idx, parent=nid, depth=d + 1)
        nodes[nid]["left"] = L
        nodes[nid]["right"] = R
        leaves.extend([L, R])
    leaf_depths = {}
    for n in leaves:
        leaf_depths.setdefault(nodes[n]["depth"], []).append(n)
    max_depth = max(leaf_depths.keys()) if leaf_depths else 0

    picked, used = [], set()
    start_depth = min(max(0, level_i - 1), max_depth)
    for d in range(start_depth, max_depth + 1):
        pool = [n for n in leaf_depths.get(d, []) if n not in used]
        if not pool:
            continue
        n = rng.choice(pool)
        used.add(n)
        picked.append(n)
        if len(picked) >= IPC:
            picked = picked[:IPC]
            break
    rem = IPC - len(picked)
    for d in range(max_depth, -1, -1):
        if rem <= 0:
            break
        pool = [n for n in leaf_depths.get(d, []) if n not in used]
        if not pool:
            continue
        rng.shuffle(pool)
        take = min(rem, len(pool))
        picked.extend(pool[:take])
        used.update(pool[:take])
        rem -= take
    reps = [X2[nodes[nid]["idx"]].mean(axis=0) for nid in picked[:IPC]]
    return np.stack(reps, axis=0)


@pytest.mark.parametrize("ipc,level,criterion,seed", [(1, 6, "sse", 0), (7, 6, "sse", 0), (10, 1, "sse", 2),
                                                      (10, 3, "var", 1)])
def test_divisive_modes_match_the_released_hierarchy(ipc, level, criterion, seed):
    x = np.random.default_rng(seed).normal(size=(120, 16)).astype(np.float32)
    x[:40] += 3.0
    ref = released_divisive_layer(x, ipc, random_state=seed, criterion=criterion, level_i=level)
    got = divisive_modes(x, ipc, seed, level, criterion).points
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_divisive_leaves_equal_bisecting_kmeans_on_separated_clusters():
    """The leaves are scikit-learn's BisectingKMeans (largest-inertia strategy) clusters."""
    from sklearn.cluster import BisectingKMeans

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=20.0, size=(6, 8))
    x = np.concatenate([c + rng.normal(size=(15 + 5 * j, 8)) for j, c in enumerate(centers)]).astype(np.float32)
    ours_ = divisive_modes(x, 6, 0).points
    lib = BisectingKMeans(n_clusters=6, bisecting_strategy="biggest_inertia", n_init=10,
                          random_state=0).fit(x).cluster_centers_
    def key(a):
        return a[np.lexsort(a.T[::-1])]

    np.testing.assert_allclose(key(ours_), key(lib.astype(np.float32)), atol=1e-4)


def test_option_checks():
    with pytest.raises(Mgd3Error, match="--tangent-dim must be in 1..11"):
        ManifoldGDOptions(tangent_dim=12)
    with pytest.raises(Mgd3Error, match="--neighbors"):
        ManifoldGDOptions(neighbors=400)
    with pytest.raises(Mgd3Error, match="--manifold-points"):
        ManifoldGDOptions(manifold_points=301)


def test_conflicting_options_are_one_line_errors(digits_model, tmp_path, capsys):
    """Before any data loads: a tangent plane of more dimensions than its neighbours span, or than
    the latent has (digits: 4×4×4 = 64 values)."""
    from inprocess import run_main

    for extra, msg in ((["--tangent-dim", "12"], "--tangent-dim must be in 1..11"),
                       (["--neighbors", "100", "--tangent-dim", "80"], "larger than the latent (64 values)"),
                       (["--manifold-points", "7"], "--manifold-points must be even")):
        r = run_main(capsys, "distill", "--data", "digits", "--model", digits_model, "--method", "manifoldgd",
                     "--ipc", "1", "--out", tmp_path / "x", "--quiet", *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("mgd3: error:") and msg in lines[0], \
            r.stderr
    assert not (tmp_path / "x").exists()
