"""Real-data layer: Fashion-MNIST IDX files, sklearn digits, image folders, ImageNet subsets."""

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgd3.io.arrays import FASHION_MNIST_DIR, read_idx
from mgd3.io.data import DATASETS, load_data, read_class_map
from mgd3.io.imagenet_classes import IMAGEIDC, IMAGENETTE, IMAGENETTE_LABELS, IMAGEWOOF
from mgd3.errors import Mgd3Error

FMNIST = Path(os.environ.get("MGD3_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"Fashion-MNIST IDX files not in {FMNIST} "
                                         "(apt-get install dataset-fashion-mnist)")


def _img(path: Path, size=(12, 10), mode="RGB", value=None, seed=0) -> Path:
    """A small random (or constant) image file; size is (W, H) as PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    c = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], c), value, np.uint8) if value is not None else \
        rng.integers(0, 256, (size[1], size[0], c), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if c == 1 else arr, mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """A flat ImageFolder: three classes, RGB and grayscale, non-square sizes, PNG and JPEG."""
    root = tmp_path / "flat"
    _img(root / "cat" / "a.png", (12, 10), "RGB", seed=1)
    _img(root / "cat" / "b.jpg", (9, 14), "RGB", seed=2)
    _img(root / "ant" / "a.png", (16, 16), "L", seed=3)
    _img(root / "ant" / "sub" / "b.png", (10, 7), "L", seed=4)  # nested files count (torchvision)
    _img(root / "bee" / "x.bmp", (20, 11), "RGB", seed=5)
    (root / "bee" / "notes.txt").write_text("not an image")
    (root / "bee" / ".hidden.png").write_bytes(b"junk")  # e.g. macOS "._" files: skipped
    return root


@pytest.fixture
def imagenet(tmp_path):
    """A fake ImageNet-1K root with the ImageNette wnid folders (train/ and val/)."""
    root = tmp_path / "imagenet"
    for k, w in enumerate(IMAGENETTE):
        _img(root / "train" / w / f"{w}_1.JPEG", (14, 12), seed=k)
        _img(root / "train" / w / f"{w}_2.JPEG", (12, 14), seed=100 + k)
        _img(root / "val" / w / f"ILSVRC2012_val_{k:08d}.JPEG", (13, 13), seed=200 + k)
    return root


def _all(ds, batch_size=64, num_workers=0):
    xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers))
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- registry and arguments


def test_registry_names_and_unknown_dataset():
    assert set(DATASETS.names()) == {"fashion-mnist", "digits", "imagenette", "imagewoof", "imageidc",
                                     "imagenet100"}
    with pytest.raises(Mgd3Error, match="unknown dataset 'mnist'.*digits.*fashion-mnist.*imagenette"):
        load_data("mnist")
    with pytest.raises(Mgd3Error, match="unknown split 'valid'"):
        load_data("digits", "valid")
    with pytest.raises(Mgd3Error, match="channels must be 1 or 3"):
        load_data("digits", channels=2)
    with pytest.raises(Mgd3Error, match="resolution"):
        load_data("digits", resolution=0)


# --------------------------------------------------------------------------- digits


def test_digits_split_values_and_determinism():
    from sklearn.datasets import load_digits

    train, test = load_data("digits"), load_data("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.class_ids == train.class_names == [str(i) for i in range(10)]
    assert train.labels == [None] * 10 and (train.resolution, train.channels) == (8, 1)
    assert train.targets.dtype == np.int64
    for c in range(10):  # stratified: every class in both splits, ~80/20
        n_tr, n_te = len(train.indices(c)), len(test.indices(c))
        assert n_te > 0 and abs(n_tr / (n_tr + n_te) - 0.8) < 0.03
    x, y = _all(train.dataset())
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(y, torch.from_numpy(train.targets))
    # 0..16 -> [-1, 1] exactly; the split holds distinct sklearn images, together all of them
    ref = load_digits()
    vals = torch.from_numpy(ref.images).float() / 8 - 1  # (1797, 8, 8)
    xt, _ = _all(test.dataset())
    both = torch.cat([x, xt])[:, 0]
    assert torch.equal(torch.sort(both.flatten(1).sum(1)).values, torch.sort(vals.flatten(1).sum(1)).values)
    assert set(torch.unique(x).tolist()) <= {k / 8 - 1 for k in range(17)}
    again = load_data("digits")
    assert np.array_equal(again.targets, train.targets) and again.fingerprint() == train.fingerprint()
    assert torch.equal(again.dataset()[17][0], train.dataset()[17][0])


def test_digits_resize_and_channels():
    d = load_data("digits", "test", resolution=16, channels=3)
    x, _ = _all(d.dataset(d.indices(3)))
    assert x.shape == (len(d.indices(3)), 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray -> RGB repeats
    assert d.fingerprint() != load_data("digits", "test").fingerprint()


def test_class_subset_order_names_indices_and_errors():
    d = load_data("digits", classes=["7", "2", "5"])
    assert d.class_ids == ["7", "2", "5"]
    full = load_data("digits")
    assert np.array_equal(d.indices(0), np.arange(len(d))[d.targets == 0])
    assert len(d.indices(0)) == len(full.indices(7)) and set(d.targets.tolist()) == {0, 1, 2}
    # items keep the full split's order; the class index is the position in `classes`
    x_sub = torch.stack([d.dataset()[int(i)][0] for i in d.indices(0)[:5]])
    x_full = torch.stack([full.dataset()[int(i)][0] for i in full.indices(7)[:5]])
    assert torch.equal(x_sub, x_full)
    assert d.fingerprint() != full.fingerprint()
    with pytest.raises(Mgd3Error, match=r"unknown class 'eleven'; available class ids: 0, 1, 2, .*, 9"):
        load_data("digits", classes=["eleven"])
    with pytest.raises(Mgd3Error, match="given twice"):
        load_data("digits", classes=["3", "3"])
    assert load_data("digits", classes=[]).class_ids == full.class_ids


# --------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_real_files():
    train = load_data("fashion-mnist")
    test = load_data("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert (train.resolution, train.channels) == (28, 1)
    assert train.class_names[9] == "Ankle boot" and train.class_ids[9] == "Ankle_boot"
    assert train.class_ids[0] == "T-shirt_top" and train.class_names[0] == "T-shirt/top"
    assert train.targets[0] == 9  # the first training item is an ankle boot
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    x, y = _all(test.dataset(), batch_size=2000)  # whole split through the batched fast path
    assert x.shape == (10000, 1, 28, 28) and x.min() == -1 and x.max() == 1
    raw = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(x[:, 0], torch.from_numpy(np.array(raw)).float() / 255 * 2 - 1)
    assert torch.equal(y, torch.from_numpy(test.targets))
    assert torch.equal(test.dataset()[123][0], x[123])  # one item == the same item of a batch
    assert train.fingerprint() == load_data("fashion-mnist").fingerprint() != test.fingerprint()


@needs_fmnist
def test_fashion_mnist_subset_by_name_and_conversion():
    d = load_data("fashion-mnist", "test", resolution=32, channels=3, classes=["Ankle boot", "Trouser", "0"])
    assert d.class_ids == ["Ankle_boot", "Trouser", "T-shirt_top"]
    assert d.class_names == ["Ankle boot", "Trouser", "T-shirt/top"] and len(d) == 3000
    x, y = _all(d.dataset(np.arange(0, 3000, 7)), batch_size=100)
    assert x.shape == (429, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2])
    assert y.tolist() == d.targets[::7].tolist()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_dir_override_and_corrupt_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    imgs, labs = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labs)
    monkeypatch.setenv("MGD3_FASHION_MNIST_DIR", str(tmp_path))
    d = load_data("fashion-mnist", classes=["Bag"])
    assert d.class_ids == ["Bag"] and len(d) == 3
    x, _ = _all(d.dataset())
    assert torch.equal(x[:, 0], torch.from_numpy(imgs[[8, 18, 28]]).float() / 255 * 2 - 1)
    fp = d.fingerprint()

    bad = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[:-100]))  # truncated data
    with pytest.raises(Mgd3Error, match="train-images-idx3-ubyte.gz is corrupt or truncated"):
        load_data("fashion-mnist")
    bad.write_bytes(gzip.compress(raw)[:200])  # truncated gzip stream
    with pytest.raises(Mgd3Error, match="train-images-idx3-ubyte.gz is corrupt"):
        load_data("fashion-mnist")
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))  # float magic, not unsigned byte
    with pytest.raises(Mgd3Error, match="bad magic number"):
        load_data("fashion-mnist")
    _write_idx(bad, imgs)
    os.utime(bad, ns=(1, 1))
    assert load_data("fashion-mnist", classes=["Bag"]).fingerprint() != fp  # mtime is part of it

    monkeypatch.setenv("MGD3_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(Mgd3Error, match=r"Fashion-MNIST not found in .*nowhere \(install it with: apt-get "
                                        r"install dataset-fashion-mnist, or set MGD3_FASHION_MNIST_DIR\)"):
        load_data("fashion-mnist")


# --------------------------------------------------------------------------- image folders


def test_image_folder_classes_shapes_and_channels(folder):
    d = load_data(str(folder), resolution=8)
    assert d.name == str(folder) and d.split == "train"
    assert d.class_ids == d.class_names == ["ant", "bee", "cat"]  # sorted folder names
    assert d.labels == [None] * 3 and d.channels == 3
    assert d.targets.tolist() == [0, 0, 1, 2, 2]
    x, y = _all(d.dataset())
    assert x.shape == (5, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])  # gray file -> RGB
    assert not torch.equal(x[2, 0], x[2, 1])
    assert load_data(str(folder)).resolution == 256  # folders default to 256
    # RGB -> gray is PIL's "L"; at the native size there is no resize
    g = load_data(str(folder), resolution=16, channels=1, classes=["ant"])
    x = g.dataset()[0][0]
    ref = np.asarray(Image.open(folder / "ant" / "a.png").convert("L"), np.float32)
    assert x.shape == (1, 16, 16) and torch.allclose(x[0], torch.from_numpy(ref) / 255 * 2 - 1)
    up = load_data(str(folder), resolution=12, channels=1, classes=["cat"]).dataset()[0][0]
    assert up.shape == (1, 12, 12) and up.min() >= -1 and up.max() <= 1  # 12x10 upscaled, cropped


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    arr = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40: left half black, right half white
    arr[:, 20:] = 255
    (tmp_path / "c").mkdir()
    Image.fromarray(arr).save(tmp_path / "c" / "wide.png")
    x = load_data(str(tmp_path), resolution=8).dataset()[0][0]  # (3, 8, 8)
    assert x.shape == (3, 8, 8)
    # 40x20 -> 16x8, the centre 8 columns straddle the edge: 4 dark then 4 bright
    assert (x[:, :, :3] < -0.9).all() and (x[:, :, 5:] > 0.9).all()
    ref = TF.center_crop(TF.resize(torch.from_numpy(arr).permute(2, 0, 1).float() / 255, 8,
                                   interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1), 8)
    assert torch.allclose(x, ref * 2 - 1, atol=1e-6)


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(Mgd3Error, match="does not exist"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(Mgd3Error, match=r"no test split: looked for .*flat/train with .*flat/val or .*flat/test"):
        load_data(str(folder), "test")
    with pytest.raises(Mgd3Error, match=r"unknown class 'dog'; available class ids: ant, bee, cat"):
        load_data(str(folder), classes=["dog"])
    (folder / "empty").mkdir()
    with pytest.raises(Mgd3Error, match=r"class folder .*flat/empty has no images"):
        load_data(str(folder))
    assert load_data(str(folder), classes=["cat"]).class_ids == ["cat"]  # other classes need not be valid
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(Mgd3Error, match="is not a folder"):
        load_data(str(tmp_path / "file.txt"))


def test_corrupt_image_names_the_file(folder):
    (folder / "cat" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = (folder / "cat" / "a.png").read_bytes()
    (folder / "cat" / "d.png").write_bytes(good[: len(good) // 2])  # truncated
    d = load_data(str(folder), resolution=8, classes=["cat"])
    assert len(d) == 4  # listed at load, read when used
    ds = d.dataset()
    with pytest.raises(Mgd3Error, match=r"cannot read image .*cat/c\.png") as e:
        ds[2]
    assert "\n" not in str(e.value)
    with pytest.raises(Mgd3Error, match=r"cannot read image .*cat/d\.png"):
        ds[3]
    it = iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2))
    try:
        with pytest.raises(Mgd3Error, match=r"c\.png"):  # the type survives DataLoader workers
            list(it)
    finally:
        # the traceback keeps the iterator in a reference cycle; collected later, its workers
        # take 2 x 5 s to time out, so shut them down here
        it._shutdown_workers()


def test_train_val_folders_share_classes(tmp_path):
    root = tmp_path / "tv"
    for c in ("b", "a"):
        _img(root / "train" / c / "1.png", seed=1)
        _img(root / "train" / c / "2.png", seed=2)
    _img(root / "val" / "b" / "9.png", seed=3)
    with pytest.raises(Mgd3Error, match=r"tv/val lacks 1 train class folder\(s\): a"):
        load_data(str(root), "test")
    _img(root / "val" / "a" / "9.png", seed=4)
    _img(root / "val" / "zz" / "9.png", seed=5)  # a class train lacks: ignored (warning)
    train, test = load_data(str(root), resolution=4), load_data(str(root), "test", resolution=4)
    assert train.class_ids == test.class_ids == ["a", "b"]
    assert (len(train), len(test)) == (4, 2) and test.targets.tolist() == [0, 1]
    assert test.fingerprint() != train.fingerprint()
    assert load_data(str(root), "test", classes=["b"]).class_ids == ["b"]


def test_fingerprint_tracks_files_resolution_and_channels(folder):
    fp = load_data(str(folder), resolution=8).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert load_data(str(folder), resolution=8).fingerprint() == fp
    assert load_data(str(folder), resolution=16).fingerprint() != fp
    assert load_data(str(folder), resolution=8, channels=1).fingerprint() != fp
    assert load_data(str(folder), resolution=8, classes=["cat", "bee", "ant"]).fingerprint() != fp
    _img(folder / "bee" / "new.png", seed=9)
    fp2 = load_data(str(folder), resolution=8).fingerprint()
    assert fp2 != fp
    _img(folder / "bee" / "new.png", (13, 10), seed=9)  # same name, new content (size and mtime)
    assert load_data(str(folder), resolution=8).fingerprint() != fp2


def test_dataloader_workers_and_pickling(folder):
    d = load_data(str(folder), resolution=8, channels=1)
    x0, y0 = _all(d.dataset(), batch_size=2)
    x2, y2 = _all(d.dataset(), batch_size=2, num_workers=2)
    assert torch.equal(x0, x2) and torch.equal(y0, y2) and x0.shape == (5, 1, 8, 8)
    back = pickle.loads(pickle.dumps(d))
    assert back.fingerprint() == d.fingerprint() and torch.equal(back.dataset([4])[0][0], x0[4])
    sub = d.dataset(d.indices(2))
    assert len(sub) == 2 and [sub[i][1] for i in range(2)] == [2, 2]
    with pytest.raises(IndexError):
        d.dataset([5])
    digits = load_data("digits", "test", resolution=4)
    xa, _ = _all(digits.dataset(), batch_size=50, num_workers=2)
    assert xa.shape == (360, 1, 4, 4)


# --------------------------------------------------------------------------- ImageNet subsets


def test_imagenette_from_a_root(imagenet, monkeypatch):
    monkeypatch.delenv("MGD3_IMAGENET_ROOT", raising=False)
    d = load_data("imagenette", data_root=str(imagenet), resolution=8)
    assert d.name == "imagenette" and d.class_ids == IMAGENETTE and d.labels == IMAGENETTE_LABELS
    assert d.class_names[0] == "tench, Tinca tinca" and d.class_names[9] == "parachute, chute"
    assert len(d) == 20 and d.targets.tolist() == [k // 2 for k in range(20)]
    x, _ = _all(d.dataset())
    assert x.shape == (20, 3, 8, 8)
    val = load_data(f"imagenette:{imagenet}", "test", resolution=8)
    assert len(val) == 10 and val.class_ids == IMAGENETTE and val.labels == IMAGENETTE_LABELS
    monkeypatch.setenv("MGD3_IMAGENET_ROOT", str(imagenet))
    sub = load_data("imagenette", classes=["golf ball", "tench", "n02979186"])
    assert sub.class_ids == ["n03445777", "n01440764", "n02979186"] and sub.labels == [574, 0, 482]
    assert sub.fingerprint() == load_data(f"imagenette:{imagenet}",
                                          classes=["n03445777", "n01440764", "n02979186"]).fingerprint()


def test_imagenet_subset_errors(imagenet, tmp_path, monkeypatch):
    monkeypatch.delenv("MGD3_IMAGENET_ROOT", raising=False)
    with pytest.raises(Mgd3Error, match="--data-root.*MGD3_IMAGENET_ROOT"):
        load_data("imagewoof")
    with pytest.raises(Mgd3Error, match="ImageNet root .*nowhere does not exist.*--data-root"):
        load_data("imagenette", data_root=str(tmp_path / "nowhere"))
    # ImageWoof: no wnid folder of it in this root; the error lists the missing ones
    with pytest.raises(Mgd3Error, match=r"lacks 10 imagewoof class folder\(s\): n02096294, n02093754"):
        load_data(f"imagewoof:{imagenet}")
    for w in IMAGENETTE[3:5]:
        for f in (imagenet / "train" / w).iterdir():
            f.unlink()
        (imagenet / "train" / w).rmdir()
    with pytest.raises(Mgd3Error, match=f"lacks 2 imagenette class folder\\(s\\): {IMAGENETTE[3]}, {IMAGENETTE[4]}$"):
        load_data("imagenette", data_root=str(imagenet))
    assert load_data(f"imagenette:{imagenet}", classes=["0", "1"]).class_ids == IMAGENETTE[:2]
    with pytest.raises(Mgd3Error, match=r"unknown class 'dog'; available class ids: n01440764, n02102040"):
        load_data(f"imagenette:{imagenet}", classes=["dog"])
    # ImageNet val in its flat (unsorted) layout
    flat = tmp_path / "in2"
    _img(flat / "train" / IMAGEWOOF[0] / "a.JPEG")
    _img(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(Mgd3Error, match="sorted into one sub-folder per class"):
        load_data(f"imagewoof:{flat}", "test", classes=[IMAGEWOOF[0]])


def test_imagewoof_keeps_spec_order_and_imageidc_labels(tmp_path):
    root = tmp_path / "in"
    for k, w in enumerate(IMAGEWOOF + IMAGEIDC):
        _img(root / "train" / w / "a.JPEG", (9, 9), seed=k)
    woof = load_data(f"imagewoof:{root}", resolution=4)
    assert woof.class_ids == IMAGEWOOF != sorted(IMAGEWOOF)  # the order of docs/METHODS.md §4.3, not sorted
    assert woof.labels == [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]
    assert woof.class_names[8] == "golden retriever"
    idc = load_data(f"imageidc:{root}", resolution=4)
    assert idc.class_ids == IMAGEIDC and idc.labels == [None] * 10  # not a full ImageNet-1K root
    assert idc.class_names[0] == "bonnet, poke bonnet"
    # a full ImageNet-1K train folder (1000 wnids): label = index among the sorted wnids (docs/METHODS.md §4)
    fillers = [f"n{90000000 + i:08d}" for i in range(1000 - len(set(IMAGEWOOF + IMAGEIDC)))]
    for w in fillers:
        (root / "train" / w).mkdir()
    everything = sorted(set(fillers) | set(IMAGEWOOF) | set(IMAGEIDC))
    idc = load_data(f"imageidc:{root}", resolution=4)
    assert idc.labels == [everything.index(w) for w in IMAGEIDC]
    m = tmp_path / "map.json"
    m.write_text(json.dumps({IMAGEIDC[0]: 7}))
    assert load_data(f"imageidc:{root}", resolution=4, class_map=str(m)).labels[0] == 7


# --------------------------------------------------------------------------- class maps


def test_class_map_json_and_text(tmp_path, imagenet):
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"3": 30, "7": 70, "not-a-class": 1}))
    d = load_data("digits", classes=["7", "3", "5"], class_map=str(js))
    assert d.labels == [70, 30, None]
    txt = tmp_path / "map.txt"
    txt.write_text("# class_id label\n\nant 5\ncat   9  # trailing comment\n")
    f = tmp_path / "f"
    for c in ("ant", "bee", "cat"):
        _img(f / c / "a.png")
    assert load_data(str(f), class_map=str(txt)).labels == [5, None, 9]
    # a map overrides the built-in ImageNette labels, only for the classes it names
    txt.write_text(f"{IMAGENETTE[1]} 1\n")
    assert load_data(f"imagenette:{imagenet}", class_map=str(txt)).labels == [0, 1] + IMAGENETTE_LABELS[2:]
    # class names work as keys too (Fashion-MNIST style ids with spaces)
    txt.write_text("Ankle boot 9\nT-shirt_top 0\n")
    assert read_class_map(txt) == {"Ankle boot": 9, "T-shirt_top": 0}


@pytest.mark.parametrize("text,match", [
    ("ant 1\nbee\n", r"map\.txt, line 2: expected 'CLASS_ID LABEL'"),
    ("ant 1\n\nbee one\n", r"map\.txt, line 3: expected"),
    ("ant 1\nant 2\n", r"map\.txt, line 2: class 'ant' is given twice"),
    ('{"ant": 1,\n "bee": }', r"map\.txt, line 2: invalid JSON"),
    ('{"ant": 1.5}', r"map\.txt, class 'ant': label 1\.5 is not a non-negative integer"),
    ('["ant"]', r"map\.txt, line 1: expected 'CLASS_ID LABEL'"),
])
def test_class_map_malformed(tmp_path, text, match):
    p = tmp_path / "map.txt"
    p.write_text(text)
    with pytest.raises(Mgd3Error, match=match):
        read_class_map(p)
    with pytest.raises(Mgd3Error, match="does not exist"):
        read_class_map(tmp_path / "missing.json")
