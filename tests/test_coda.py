"""CoDA against its released code (github.com/zzzlt422/CoDA), on the tiny saved DiT.

1. The sampling loop: `released_loop` transcribes the denoising loop of the released
   `CoDA_SDXLBasePipeline.__call__` literally (its names, its order: conditional x̂0, Δε on the
   conditional branch, then CFG, then `scheduler.step`). Its model call is the DiT's (class label
   instead of text embeddings; the unconditional half first, as the SDXL pipeline) and its
   scheduler diffusers' `DDPMScheduler` on mgd3's timesteps (the released code runs SDXL with
   DPM-Solver, whose `sigmas` at a timestep are sqrt((1 − ᾱ)/ᾱ): computed so below).
2. The core samples: the released `hdbscan_post` / `split_hdbscan_kmeans` and the selection loop
   of `CoDA_main.py`, transcribed with scikit-learn's `HDBSCAN` in place of the `hdbscan`
   package's (the one change), give mgd3's indices on embeddings built to take every branch;
   mgd3's embedding is the library calls StandardScaler + umap-learn's UMAP.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mgd3.errors import Mgd3Error
from mgd3.methods import SamplerConfig, get_method
from mgd3.methods.coda import CoDAOptions, guided_until
from mgd3.core.mode_discovery import core_samples, pooled_kmeans_modes
from reference_models import build_reference_dit
from test_reference import (_scheduler_kwargs, float64_table, generate_with_modes, gens, items_for, make_ctx,
                            random_modes)

TOL = 1e-5  # the same float32 arithmetic in another order, 50 steps

pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """Fixed variance (ε only), as SDXL's UNet; `dit` (tests/conftest.py) loads this one."""
    return build_reference_dit(tmp_path_factory.mktemp("ref") / "dit-fixed", learned_sigma=False)


def released_loop(folder, items, represent_latent, timesteps, *, guideTPercent=0.9, CoDA_guidance_scale=0.05,
                  guidance_scale=4.0, sigma_factor=True):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    raw = DiTTransformer2DModel.from_pretrained(folder / "transformer", low_cpu_mem_usage=False).eval()
    scheduler = float64_table(DDPMScheduler(**_scheduler_kwargs(folder), clip_sample=False,
                                            variance_type="fixed_small"))
    scheduler.set_timesteps(timesteps=timesteps)
    timesteps = scheduler.timesteps
    acp = scheduler.alphas_cumprod
    sigmas = ((1 - acp[timesteps]) / acp[timesteps]) ** 0.5  # DPMSolverMultistepScheduler.sigmas
    g = gens(items)
    latents = torch.stack([torch.randn(represent_latent.shape[1:], generator=gi) for gi in g])
    y = torch.as_tensor([it.cls.label for it in items])
    null = torch.full_like(y, 10)
    stop_idx = min(int(len(timesteps) * guideTPercent), len(timesteps) - 1)
    calculated_stop_t_value = timesteps[stop_idx].item()
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            latent_model_input = torch.cat([latents] * 2)
            noise_pred = raw(latent_model_input, timestep=t.expand(len(latent_model_input)),
                             class_labels=torch.cat([null, y])).sample
            noise_pred_uncond, noise_pred_text_ori = noise_pred.chunk(2)
            if CoDA_guidance_scale > 0.0 and t.item() > calculated_stop_t_value:
                current_latent_cond = latent_model_input.chunk(2)[1]
                alpha_prod_t = scheduler.alphas_cumprod[t]
                sqrt_alpha_prod_t = torch.sqrt(alpha_prod_t)
                sqrt_one_minus_alpha_prod_t = torch.sqrt(1.0 - alpha_prod_t)
                current_xstart_cond = (current_latent_cond - sqrt_one_minus_alpha_prod_t * noise_pred_text_ori) / \
                    sqrt_alpha_prod_t
                pix_diff = represent_latent - current_xstart_cond
                current_sigma_t_for_guidance = sigmas[i] if sigma_factor else 1.0
                pix_guide_mark = pix_diff * CoDA_guidance_scale * current_sigma_t_for_guidance
                delta_epsilon_text = - (sqrt_alpha_prod_t / sqrt_one_minus_alpha_prod_t) * pix_guide_mark
                noise_pred_text = noise_pred_text_ori + delta_epsilon_text
            else:
                noise_pred_text = noise_pred_text_ori
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, generator=g).prev_sample
    return latents


def ours(backend, items, samples, *, steps=50, cfg=4.0, **options):
    cls = get_method("coda")
    method = cls(cls.Options(coda_modes="pooled-kmeans", **options))
    ctx = make_ctx(backend, items, SamplerConfig(sampler="ddpm", steps=steps, cfg=cfg))
    return generate_with_modes(method, ctx, items, samples), ctx  # the core samples are given as modes


@pytest.mark.parametrize("sigma", ["on", "off"])
def test_coda_matches_the_released_loop(dit_folder, dit, sigma):
    items = items_for([2, 7], ipc=2)
    samples = random_modes(len(items), dit.latent_shape, seed=5)
    gamma = 0.05 if sigma == "on" else 0.5
    a, ctx = ours(dit, items, samples, coda_sigma_scale=sigma, coda_guidance_scale=gamma)
    ts = [int(t) for t in ctx.plan.timesteps[::-1]]
    ref = released_loop(dit_folder, items, samples, ts, sigma_factor=sigma == "on", CoDA_guidance_scale=gamma)
    err = (a - ref).abs().max().item()
    assert err <= TOL, f"max abs latent difference {err:.2e}"
    plain = released_loop(dit_folder, items, samples, ts, CoDA_guidance_scale=0.0)
    assert (plain - ref).abs().max().item() > 1e-2
    other = released_loop(dit_folder, items, samples, ts, sigma_factor=sigma != "on", CoDA_guidance_scale=gamma)
    assert (other - ref).abs().max().item() > 1e-2


def test_guide_fraction_stops_where_the_released_code_does():
    ts = list(range(980, -1, -20))  # 50 steps, noisiest first
    assert guided_until(ts, 0.9) == ts[45] and guided_until(ts, 1.0) == ts[-1] and guided_until(ts, 0.0) == ts[0]


# --------------------------------------------------------------------------- core samples


def released_core_samples(X_processed, IPC, min_cluster_size=55, min_samples=3, num_seed_candidates=3):
    """`CoDA_main.py`'s clustering block + `postprocess.hdbscan_post`, literally (sklearn HDBSCAN)."""
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.metrics.pairwise import euclidean_distances

    args = SimpleNamespace(IPC=IPC, min_cluster_size=min_cluster_size, min_samples=min_samples,
                           num_seed_candidates=num_seed_candidates, next_new_id=0)

    def split_hdbscan_kmeans(args, X, clusters, working_clusters, cur_mom_cluster, min_cluster_size,
                             num_seed_candidates):
        mom_global_indices = np.where(cur_mom_cluster['points_mask'])[0]
        sub_clusterer = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=args.min_samples)
        cur_mom_points = X[mom_global_indices]
        sub_labels = sub_clusterer.fit_predict(cur_mom_points)
        num_sub_clusters = len(np.unique(sub_labels)) - (1 if -1 in sub_labels else 0)
        if num_sub_clusters < 2:
            return
        del clusters[cur_mom_cluster['cluster_id']]
        found_sub_clusters = []
        for i in range(num_sub_clusters):
            sub_mask_local = (sub_labels == i)
            sub_size = np.sum(sub_mask_local)
            points_in_sub_cluster = cur_mom_points[sub_mask_local]
            best_point_idx = np.argmax(sub_clusterer.probabilities_[sub_mask_local])
            center_coord = points_in_sub_cluster[best_point_idx]
            found_sub_clusters.append({'size': sub_size, 'center': center_coord})
        found_sub_clusters.sort(key=lambda c: c['size'], reverse=True)
        actual_num_candidates = min(num_seed_candidates, num_sub_clusters)
        seed_pairs = list(itertools.combinations(range(actual_num_candidates), 2))
        best_kmeans_result = None
        min_inertia = float('inf')
        for idx1, idx2 in seed_pairs:
            initial_seeds = np.array([found_sub_clusters[idx1]['center'], found_sub_clusters[idx2]['center']])
            kmeans = KMeans(n_clusters=2, init=initial_seeds, n_init=1, random_state=0).fit(cur_mom_points)
            if kmeans.inertia_ < min_inertia:
                min_inertia = kmeans.inertia_
                best_kmeans_result = kmeans
        final_sub_labels = best_kmeans_result.labels_
        final_centers = best_kmeans_result.cluster_centers_
        temp_labels = np.full(X.shape[0], -1)
        temp_labels[cur_mom_cluster['points_mask']] = final_sub_labels
        for i in range(2):
            new_id = args.next_new_id
            args.next_new_id += 1
            mask = (temp_labels == i)
            size = np.sum(mask)
            clusters[new_id] = {'cluster_id': new_id, 'center': final_centers[i], 'size': size,
                                'points_mask': mask, 'origin': 'hdbscan_kmeans_split'}
            if size >= min_cluster_size * 2:
                working_clusters.append(clusters[new_id])

    def hdbscan_post(args, M, initial_centers, cluster_labels, X):
        ipc = args.IPC
        min_cluster_size = args.min_cluster_size
        args.next_new_id = M
        if ipc > 50:
            noise_pool_safety_factor = 1
        elif ipc > 10:
            noise_pool_safety_factor = 3
        else:
            noise_pool_safety_factor = 5
        num_seed_candidates = args.num_seed_candidates
        clusters = {}
        for cluster_id in range(M):
            mask = (cluster_labels == cluster_id)
            clusters[cluster_id] = {'cluster_id': cluster_id, 'center': initial_centers[cluster_id],
                                    'size': np.sum(mask), 'points_mask': mask, 'origin': 'hdbscan_initial'}
        if M > ipc:
            all_clusters_list = sorted(list(clusters.values()), key=lambda c: c['size'], reverse=True)
            return {c['cluster_id']: c for c in all_clusters_list[:ipc]}
        working_clusters = [info for info in clusters.values() if info['size'] >= min_cluster_size * 2]
        while len(clusters) < ipc and working_clusters:
            working_clusters.sort(key=lambda c: c['size'], reverse=True)
            cur_mom_cluster = working_clusters.pop(0)
            split_hdbscan_kmeans(args, X, clusters, working_clusters, cur_mom_cluster, min_cluster_size,
                                 num_seed_candidates)
        if len(clusters) > ipc:
            all_clusters_list = sorted(list(clusters.values()), key=lambda c: c['size'], reverse=True)
            clusters = {c['cluster_id']: c for c in all_clusters_list[:ipc]}
        if len(clusters) < ipc:
            num_to_create = ipc - len(clusters)
            assigned_points_mask = np.zeros(X.shape[0], dtype=bool)
            for cluster_info in clusters.values():
                assigned_points_mask |= cluster_info['points_mask']
            noise_indices = np.where(~assigned_points_mask)[0]
            pool_indices = [noise_indices]
            if len(noise_indices) < num_to_create * noise_pool_safety_factor:
                working_clusters = [info for info in clusters.values() if info['size'] >= min_cluster_size]
                while len(clusters) < ipc:
                    working_clusters.sort(key=lambda c: c['size'], reverse=True)
                    temp_next_new_id = args.next_new_id
                    temp_minsize = args.min_cluster_size
                    cur_mom_cluster = working_clusters[0]
                    while temp_next_new_id == args.next_new_id:
                        temp_minsize *= 0.75
                        split_hdbscan_kmeans(args, X, clusters, working_clusters, cur_mom_cluster,
                                             max(int(temp_minsize), 2), num_seed_candidates)
                        if temp_minsize <= 2:
                            break
                    working_clusters.pop(0)
            else:
                final_pool_indices = np.unique(np.concatenate(pool_indices))
                final_pool_for_kmeans = X[final_pool_indices]
                kmeans_final = KMeans(n_clusters=num_to_create, random_state=0, n_init='auto').fit(
                    final_pool_for_kmeans)
                new_centers = kmeans_final.cluster_centers_
                new_labels = kmeans_final.labels_
                for i in range(num_to_create):
                    new_id = args.next_new_id
                    args.next_new_id += 1
                    local_mask_in_pool = (new_labels == i)
                    global_indices_for_new_cluster = final_pool_indices[local_mask_in_pool]
                    mask = np.zeros(X.shape[0], dtype=bool)
                    mask[global_indices_for_new_cluster] = True
                    clusters[new_id] = {'cluster_id': new_id, 'center': new_centers[i],
                                        'size': len(global_indices_for_new_cluster), 'points_mask': mask,
                                        'origin': 'kmeans_outliers'}
        assert len(clusters) == ipc
        return clusters

    clusterer = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples)
    cluster_labels = clusterer.fit_predict(X_processed)
    M = len(np.unique(cluster_labels)) - (1 if -1 in cluster_labels else 0)
    initial_centers = []
    for cluster_id in range(M):
        mask = (cluster_labels == cluster_id)
        global_indices = np.where(mask)[0]
        best_point_global_idx = global_indices[np.argmax(clusterer.probabilities_[mask])]
        initial_centers.append(X_processed[best_point_global_idx])
    final_clusters_dict = hdbscan_post(args, M, initial_centers, cluster_labels, X_processed)
    chosen = []
    for cluster_id, cluster_info in final_clusters_dict.items():
        if cluster_info['origin'] == 'hdbscan_initial':
            mask = (cluster_labels == cluster_id)
            global_indices = np.where(mask)[0]
            center_local_idx = global_indices[np.argmax(clusterer.probabilities_[mask])]
        else:
            center_processed = cluster_info['center']
            points_in_cluster_umap = X_processed[cluster_info['points_mask']]
            distances = euclidean_distances(points_in_cluster_umap, center_processed.reshape(1, -1))
            global_indices_sub = np.where(cluster_info['points_mask'])[0]
            center_local_idx = global_indices_sub[np.argmin(distances)]
        chosen.append(int(center_local_idx))
    return chosen


def _blobs(sizes, spread, seed, noise=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=10.0, size=(len(sizes), 5))
    parts = [c + rng.normal(scale=s, size=(n, 5)) for c, n, s in zip(centers, sizes, spread)]
    if noise:
        parts.append(rng.uniform(-25, 25, size=(noise, 5)))
    return np.concatenate(parts)


@pytest.mark.parametrize("case,ipc,mcs,expect", [
    ("surplus", 2, 10, "largest"),  # HDBSCAN finds more clusters than IPC: the largest
    ("split", 6, 10, "split"),  # sub-clusters inside big clusters: strategy 1
    ("noise", 4, 10, "kmeans-noise"),  # many scattered points: strategy 2
    ("forced", 7, 10, "forced-split"),  # few noise points, clusters without sub-structure: strategy 3
])
def test_core_samples_match_the_released_post_processing(case, ipc, mcs, expect):
    emb = {"surplus": _blobs([40, 30, 20, 25], [0.5] * 4, 0),
           "split": np.concatenate([_blobs([40, 40], [0.4, 0.4], 1), _blobs([40, 40], [0.4, 0.4], 2) + 60]),
           "noise": _blobs([40, 40], [0.5, 0.5], 3, noise=120),
           "forced": _blobs([60, 50], [1.0, 1.0], 4)}[case]
    chosen, _, info = core_samples(emb, ipc, mcs, 3, 3)
    assert expect in info["strategies"] or (expect == "largest" and info["strategies"] == ["largest"])
    assert list(chosen) == released_core_samples(emb, ipc, mcs, 3, 3)
    assert len(set(chosen.tolist())) == ipc


@pytest.mark.slow
def test_umap_embedding_is_the_library_call():
    from sklearn.preprocessing import StandardScaler
    from umap import UMAP

    from mgd3.core.mode_discovery import umap_embedding

    x = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32)
    ref = UMAP(n_components=50, n_neighbors=85, min_dist=0.0, random_state=42).fit_transform(
        StandardScaler().fit_transform(x))
    np.testing.assert_array_equal(umap_embedding(x), ref)


def test_pooled_kmeans_modes_are_real_latents_nearest_the_pooled_centroids():
    from sklearn.cluster import KMeans

    x = np.random.default_rng(1).normal(size=(60, 4 * 16 * 16)).astype(np.float32)
    m = pooled_kmeans_modes(x, (4, 16, 16), 5, seed=0)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(x).reshape(60, 4, 16, 16), 2).flatten(1).numpy()
    km = KMeans(5, random_state=0, n_init="auto").fit(pooled)
    idx = np.argmin(((pooled[:, None] - km.cluster_centers_[None]) ** 2).sum(-1), axis=0)
    np.testing.assert_array_equal(m.nearest_real, idx)
    np.testing.assert_array_equal(m.points, x[idx])
    small = pooled_kmeans_modes(x[:, :4 * 4 * 4], (4, 4, 4), 3)  # latents under 8×8 are not pooled
    assert small.info["pool"] == [4, 4]


def test_option_checks():
    with pytest.raises(Mgd3Error, match="--guide-fraction"):
        CoDAOptions(guide_fraction=1.5)
    with pytest.raises(Mgd3Error, match="--min-cluster-size"):
        CoDAOptions(min_cluster_size=1)
