"""Conventions shared with other tools: hub downloads, DD-Ranking's score, nearest-mode search,
class folder names, and the one copy of each file helper."""

import math
import tracemalloc

import numpy as np
import pytest
import torch

from mgd3 import files
from mgd3.io import store
from mgd3.backends.hub import files_to_fetch
from mgd3.evaluation.scores import ars, ddrs, lrs
from mgd3.core.mode_discovery import MODE_FINDERS, find_modes, nearest

SD15 = """.gitattributes README.md v1-5-pruned.ckpt v1-5-pruned-emaonly.safetensors model_index.json
feature_extractor/preprocessor_config.json safety_checker/config.json safety_checker/model.safetensors
safety_checker/pytorch_model.bin scheduler/scheduler_config.json text_encoder/config.json
text_encoder/model.safetensors text_encoder/model.fp16.safetensors text_encoder/pytorch_model.bin
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.non_ema.safetensors unet/diffusion_pytorch_model.safetensors vae/config.json
vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.bin
""".split()
DIT = """.gitattributes README.md model_index.json scheduler/scheduler_config.json transformer/config.json
transformer/diffusion_pytorch_model.bin vae/config.json vae/diffusion_pytorch_model.bin""".split()


def test_hub_downloads_only_what_the_backend_loads():
    got = files_to_fetch(SD15)
    weights = [f for f in got if f.endswith((".safetensors", ".bin", ".ckpt"))]
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]  # no fp16 / non-ema / .bin / .ckpt / safety checker
    assert {"model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json",
            "scheduler/scheduler_config.json"} <= set(got)
    assert "README.md" not in got and ".gitattributes" not in got
    # a repo with .bin weights only (DiT-XL-2-256's first upload) keeps them
    assert files_to_fetch(DIT) == ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                                   "transformer/diffusion_pytorch_model.bin", "vae/config.json",
                                   "vae/diffusion_pytorch_model.bin"]
    sharded = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.bin"]
    assert files_to_fetch(sharded) == sorted(sharded[:4])


def test_ddrs_is_dd_rankings_formula():
    # DD-Ranking: alpha = w IOR - (1 - w) HLR (accuracies as fractions), DDRS = (e^alpha - e^-1) / (e - e^-1)
    def reference(ior_frac, hlr_frac, w=0.5):
        a = w * ior_frac - (1 - w) * hlr_frac
        return (math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1))

    assert ddrs(0.0, 0.0) == pytest.approx(reference(0, 0), abs=1e-4) == pytest.approx(0.2689, abs=1e-4)
    assert ddrs(12.5, 30.0) == pytest.approx(reference(0.125, 0.30), abs=1e-4)
    assert ddrs(100.0, -100.0, w=0.5) == pytest.approx(1.0, abs=1e-4)  # alpha = 1: the top of the scale
    assert ddrs(10.0, 20.0, w=1.0) == pytest.approx(reference(0.1, 0.2, w=1.0), abs=1e-4)
    assert ddrs(5.0, 10.0) > ddrs(5.0, 20.0) and ddrs(6.0, 10.0) > ddrs(5.0, 10.0)
    assert lrs is ddrs  # DD-Ranking 0.2 renamed DDRS to LRS


def test_ars_is_dd_rankings_formula():
    # DD-Ranking 0.2 aug_robust.py: beta = l (syn - random, aug) + (1 - l) (syn - random, no aug), l = 0.5
    e = math.exp
    assert ars(8.0, 10.0) == pytest.approx((e(0.09) - e(-1)) / (e(1) - e(-1)), abs=1e-4)
    assert ars(0.0, 0.0) == pytest.approx(0.2689, abs=1e-4)
    assert ars(10.0, 0.0, w=1.0) == pytest.approx((e(0.1) - e(-1)) / (e(1) - e(-1)), abs=1e-4)
    assert ars(10.0, 2.0) > ars(2.0, 2.0)


def test_nearest_is_exact_and_holds_no_k_by_n_by_d_array():
    rng = np.random.default_rng(0)
    points, centers = rng.normal(size=(300, 16)), rng.normal(size=(7, 16))
    brute = ((centers[:, None, :] - points[None, :, :]) ** 2).sum(-1).argmin(1)
    assert nearest(points, centers).tolist() == brute.tolist()
    # k = 10, N = 1300, D = 4096 (an ImageNet class of DiT latents): the broadcast would need 407 MiB
    points = rng.normal(size=(1300, 4096)).astype(np.float32)
    centers = points[:10] + 0.01
    tracemalloc.start()
    got = nearest(points, centers)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.tolist() == list(range(10))
    assert peak < 10 * 1300 * 4096 * 8 / 4  # well under a quarter of the k x N x D float64 array


def test_kmeans_minibatch_finder_is_d4ms_clustering():
    from sklearn.cluster import MiniBatchKMeans

    x = np.random.default_rng(1).normal(size=(60, 8)).astype(np.float32)
    m = find_modes("kmeans-minibatch", x, 4, seed=0)
    km = MiniBatchKMeans(n_clusters=4, random_state=0, n_init="auto").fit(x)
    assert np.array_equal(m.points, km.cluster_centers_.astype(np.float32)) and np.array_equal(m.assignment, km.labels_)
    assert "kmeans-minibatch" in MODE_FINDERS.names()


def test_class_folders_sort_in_class_order():
    ids = ["n02869837", "n01749939", "n02488291"]
    assert [store.class_folder(i, c, 3) for i, c in enumerate(ids)] == ["000-n02869837", "001-n01749939",
                                                                      "002-n02488291"]
    many = [store.class_folder(i, "c", 1000) for i in range(1000)]
    assert sorted(many) == many and many[-1] == "999-c"
    wide = [store.class_folder(i, "c", 21841) for i in (0, 9, 10, 21840)]
    assert wide == ["00000-c", "00009-c", "00010-c", "21840-c"] and sorted(wide) == wide


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    f = tmp_path / "a.json"
    files.write_text_atomic(f, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.write_atomic(f, fail)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_to_uint8_is_the_pixel_rounding_of_the_set_format():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    assert files.to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]
    img = torch.tensor([[[[-1.0, 1.0]]]])  # (1, 1, 1, 2)
    assert store.to_pixels(img).tolist() == [[[0, 255]]]  # grayscale: (B, R, R)


def test_cache_root_is_one(monkeypatch, tmp_path):
    from mgd3.core import encode
    from mgd3.evaluation import references

    monkeypatch.setenv("MGD3_CACHE_DIR", str(tmp_path / "c"))
    assert files.cache_root() == tmp_path / "c" and encode.cache_root is files.cache_root
    assert references.cache_root() == tmp_path / "c" / "eval"
    assert files.cache_root(tmp_path / "x") == tmp_path / "x"


def test_saved_tensors_have_the_same_bytes_whatever_the_file_name(tmp_path):
    """latents.pt of two identical runs is byte-identical: the archive does not carry the name of
    the temporary file it was written through (nor so the pid of the process)."""
    from mgd3.files import save_torch_atomic

    obj = {"latents": torch.arange(12.0).reshape(3, 4), "paths": ["a.png"]}
    save_torch_atomic(obj, tmp_path / "one" / "latents.pt")
    save_torch_atomic(obj, tmp_path / "two" / "other.pt")
    assert (tmp_path / "one" / "latents.pt").read_bytes() == (tmp_path / "two" / "other.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "two" / "other.pt", weights_only=True)["latents"], obj["latents"])
