"""Golden values: a small slice of the final latents of `plain`, `mgd3`, `d4m` and `dmgd` (DDPM and
DDIM) on a seeded tiny DiT, through the real `distill` driver, pinned as diffusers pins
`expected_slice` (tolerance 1e-4). A change of output is then a deliberate, reviewed change:
rerun with MGD3_PRINT_GOLDEN=1 to print the new slices, and say why they changed.

The model is built under its own seed inside `torch.random.fork_rng`, so it is the same in every
process and in any test order; the data (sklearn digits), the item seeds and k-means
(random_state 0) are fixed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mgd3.run.driver import DistillConfig, distill
from mgd3.methods import SamplerConfig
from reference_models import build_reference_dit

STEPS = 10
# (method, sampler) -> latents[:, 0, 0, :2] of classes 3 and 7, IPC 2 (4 images: 8 numbers)
EXPECTED = {
    ("plain", "ddpm"): [-5.489544, -0.954869, -1.007882, -1.308812, 2.676980, -0.086854, 3.626631, 0.586191],
    ("plain", "ddim"): [-2.600611, -0.980802, -0.524293, -0.593253, 1.714716, -0.135542, 1.479136, -0.350520],
    ("mgd3", "ddpm"): [-5.155697, -0.924543, -1.019453, -1.316819, 2.447853, -0.175085, 3.347403, 0.494267],
    ("mgd3", "ddim"): [-2.550482, -0.974996, -0.518396, -0.595306, 1.674381, -0.152625, 1.443882, -0.362377],
    ("d4m", "ddpm"): [-3.071053, -0.979257, -1.212502, -1.654629, 1.122155, -0.818751, 2.045062, -0.522332],
    ("d4m", "ddim"): [-1.619014, -0.881810, -0.874960, -0.816426, 0.702853, -0.789639, 0.807291, -0.765791],
    ("dmgd", "ddpm"): [-4.878735, -0.743542, -0.536329, -1.418228, 2.696650, -0.213740, 3.464129, 0.338327],
    ("dmgd", "ddim"): [-2.234838, -0.889398, -0.270594, -0.628707, 1.706507, -0.209761, 1.420396, -0.458432],
}

pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    return build_reference_dit(tmp_path_factory.mktemp("golden") / "dit", image_channels=1, resolution=8,
                               class_names=[str(i) for i in range(10)], seed=0)


def final_slice(model, out, method: str, sampler: str) -> np.ndarray:
    distill(DistillConfig(data="digits", out=str(out), model=str(model), method=method, ipc=2, classes=["3", "7"],
                          batch_size=4, progress=False, device="cpu",
                          sampler=SamplerConfig(sampler=sampler, steps=STEPS, cfg=4.0)))
    latents = torch.load(out / "latents.pt", weights_only=True)["latents"]  # (4, 4, 4, 4)
    return latents[:, 0, 0, :2].reshape(-1).numpy()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("method", ["plain", "mgd3", "d4m", "dmgd"])
def test_golden_final_latents(golden_model, tmp_path, method, sampler):
    got = final_slice(golden_model, tmp_path / "o", method, sampler)
    if os.environ.get("MGD3_PRINT_GOLDEN"):
        print(f'    ("{method}", "{sampler}"): [{", ".join(f"{v:.6f}" for v in got)}],')
    expected = np.asarray(EXPECTED[(method, sampler)], dtype=np.float32)
    assert np.abs(got - expected).max() < 1e-4, f"{method}/{sampler}: got {got.tolist()}"


def test_golden_slices_differ_between_methods():
    """The pins are not all one value: each method and sampler changes the output."""
    rows = [tuple(np.round(v, 3)) for v in EXPECTED.values()]
    assert len(set(rows)) == len(rows)
