"""Image grids a person can read (mgd3.grid): cell sizes, exact nearest-neighbour pixels, a
label column with ink in it, side-by-side blocks, same bytes on every run."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mgd3.io.grid import MIN_CELL, cell_side, compare_image, grid_image
from mgd3.io.store import write_grid


def _rows(n_classes=3, n=2, size=28, color=False, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if color else (n, size, size)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n_classes)]


def test_cell_side():
    assert cell_side(28) == 84 and cell_side(32) == 64 and cell_side(8) == 64 and cell_side(63) == 126
    assert cell_side(64) == 64 and cell_side(256) == 256 and cell_side(256, cap=128) == 128
    assert all(cell_side(s) >= MIN_CELL and cell_side(s) % s == 0 for s in range(1, MIN_CELL))


@pytest.mark.parametrize("color", [False, True])
def test_cells_are_exact_nearest_neighbour_copies(color):
    rows = _rows(color=color)
    im = np.asarray(grid_image(rows, None))  # no label column: the first cell starts at the pad
    assert im.shape[:2] == (3 * (84 + 2) + 2, 2 * (84 + 2) + 2)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = 2 + i * 86, 2 + j * 86
            up = img.repeat(3, axis=0).repeat(3, axis=1)  # every pixel a 3x3 square
            assert np.array_equal(im[y:y + 84, x:x + 84], up)


def test_labels_are_drawn_on_the_left_and_the_figure_is_deterministic(tmp_path):
    rows = [np.full((2, 28, 28), 128, np.uint8) for _ in range(3)]
    plain = np.asarray(grid_image(rows, None))
    labelled = np.asarray(grid_image(rows, ["T-shirt/top", "Trouser", "Ankle boot"]))
    extra = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and extra > 40  # a label column of readable width
    assert np.array_equal(labelled[:, extra:], plain)  # the images are untouched
    for i in range(3):  # each row's label has ink (dark pixels) beside its own row, nowhere else
        band = labelled[2 + i * 86:2 + i * 86 + 84, :extra]
        assert (band < 100).sum() > 30
    assert (labelled[:, :extra] < 100).sum() == sum((labelled[2 + i * 86:2 + i * 86 + 84, :extra] < 100).sum()
                                                   for i in range(3))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_grid(a, rows, labels=["T-shirt/top", "Trouser", "Ankle boot"])
    write_grid(b, rows, labels=["T-shirt/top", "Trouser", "Ankle boot"])
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        grid_image(rows, ["a", "b"])


def test_large_images_keep_their_size_and_comparisons_cap_them():
    big = _rows(n_classes=2, n=1, size=200)
    assert np.asarray(grid_image(big)).shape == (2 * 202 + 2, 202 + 2)
    cmp = compare_image([big, big], ["a", "b"], ["x", "y"])
    assert cmp.size[1] > 2 * 130 and cmp.size[1] < 2 * 130 + 40  # two 128-px rows and a title line


def test_comparison_puts_each_set_in_its_own_block_under_its_title():
    a, b = _rows(n=2, seed=1), _rows(n=3, seed=2)
    b[1] = b[1][:0]  # set b has no image of the second class
    im = np.asarray(compare_image([a, b], ["set a", "set b"], ["c0", "c1", "c2"]))
    solo = np.asarray(compare_image([a], [None], ["c0", "c1", "c2"]))
    label_w = solo.shape[1] - 2 - 2 * 86
    title_h = im.shape[0] - solo.shape[0]
    assert title_h > 10 and im.shape[1] == label_w + 2 + 5 * 86 + 8
    x_b = label_w + 2 + 2 * 86 + 8
    y1 = title_h + 2 + 86
    assert np.array_equal(im[y1:y1 + 84, label_w + 2:label_w + 2 + 84], a[1][0].repeat(3, 0).repeat(3, 1))
    assert np.array_equal(im[y1 - 86:y1 - 2, x_b:x_b + 84], b[0][0].repeat(3, 0).repeat(3, 1))
    assert (im[y1:y1 + 84, x_b:] == 255).all()  # the missing row stays white
    assert (im[:title_h, label_w:] < 100).any()  # the titles have ink
    buf = io.BytesIO()
    compare_image([a, b], ["set a", "set b"], ["c0", "c1", "c2"]).save(buf, format="PNG")
    buf2 = io.BytesIO()
    compare_image([a, b], ["set a", "set b"], ["c0", "c1", "c2"]).save(buf2, format="PNG")
    assert buf.getvalue() == buf2.getvalue()
