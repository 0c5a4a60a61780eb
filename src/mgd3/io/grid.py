"""Figures: image grids a person can read — one row per class with the class name on the left,
small images enlarged (nearest neighbour) to at least MIN_CELL pixels a cell.

Used for a distilled set's OUT/grid.png, the report's grids and the report's side-by-side
comparison of several sets. Pure PIL and numpy with PIL's own font, so a figure is the same
bytes on every run of a machine and needs no font installed.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 64  # smallest cell side in pixels: a 28-px image is drawn at 3x (84 px)
COMPARE_CELL = 128  # largest cell side in a comparison of several sets (bigger images are reduced)
MAX_LABEL_CHARS = 28  # longer class names are cut ("tench, Tinca tinca" stays whole)
PAD = 2
WHITE, INK = 255, 0


def cell_side(size: int, cap: int | None = None) -> int:
    """Side of a cell for images of `size` pixels: an integer multiple of `size` of at least
    MIN_CELL (nearest-neighbour upscale keeps every pixel a sharp square); larger images keep
    their size, or are reduced to `cap`."""
    if size < MIN_CELL:
        return size * math.ceil(MIN_CELL / size)
    return size if cap is None else min(size, cap)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 3] + "..."


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    if not text:
        return 0
    x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
    return int(math.ceil(x1 - x0))


def _resize(img: np.ndarray, side: int) -> Image.Image:
    """One image (R, R[, 3]) uint8 -> PIL image of side x side (nearest up, box-filtered down)."""
    im = Image.fromarray(np.ascontiguousarray(img))
    if im.size == (side, side):
        return im
    resample = Image.NEAREST if side >= max(im.size) else Image.BOX
    return im.resize((side, side), resample)


def _font_size(cell: int) -> int:
    return max(11, min(18, cell // 5))


def grid_image(rows: list[np.ndarray], labels: list[str] | None = None, cap: int | None = None,
               pad: int = PAD) -> Image.Image:
    """rows: per class an array (n, R, R[, 3]) uint8 (n may differ between rows); labels: one name
    per row, drawn in a column on the left (None: no label column)."""
    return compare_image([rows], [None], labels, cap=cap, pad=pad)


def compare_image(sets: list[list[np.ndarray]], titles: list[str | None], labels: list[str] | None = None,
                  cap: int | None = COMPARE_CELL, pad: int = PAD) -> Image.Image:
    """Several sets side by side: one row per class (the class name on the left), one block of
    columns per set (its title above it when given). sets[s][i]: the images (n, R, R[, 3]) uint8
    of class i in set s; every set has the same classes in the same order."""
    if not sets or not any(len(rows) for rows in sets):
        raise ValueError("a grid needs at least one row of images")
    n_rows = max(len(rows) for rows in sets)
    if labels is not None and len(labels) != n_rows:
        raise ValueError(f"{len(labels)} labels for {n_rows} rows")
    first = next(r for rows in sets for r in rows if len(r))
    size = max(int(first.shape[1]), int(first.shape[2]))
    color = any(r.ndim == 4 for rows in sets for r in rows if len(r))
    mode = "RGB" if color else "L"
    cell = cell_side(size, cap)
    font = _font(_font_size(cell))
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    names = [short(t) for t in labels] if labels is not None else None
    label_w = (max(_text_width(probe, t, font) for t in names) + 4 * pad) if names else 0
    widths = [max((len(r) for r in rows), default=0) for rows in sets]
    gap = 4 * pad if len(sets) > 1 else 0  # between the blocks of two sets
    block_w = [w * (cell + pad) for w in widths]
    titles = [None if t is None else short(t) for t in titles]
    title_h = (_font_size(cell) + 4 * pad) if any(titles) else 0
    width = label_w + pad + sum(block_w) + gap * (len(sets) - 1)
    height = title_h + pad + n_rows * (cell + pad)
    canvas = Image.new(mode, (width, height), (WHITE,) * 3 if color else WHITE)
    draw = ImageDraw.Draw(canvas)
    ink = (INK,) * 3 if color else INK
    x0 = label_w + pad
    for s, rows in enumerate(sets):
        if titles[s]:
            tw = _text_width(draw, titles[s], font)
            draw.text((x0 + max(0, (block_w[s] - tw) // 2), pad), titles[s], fill=ink, font=font)
        for i, row in enumerate(rows):
            y = title_h + pad + i * (cell + pad)
            for j, img in enumerate(row):
                im = _resize(img, cell).convert(mode)
                canvas.paste(im, (x0 + j * (cell + pad), y))
        x0 += block_w[s] + gap
    if names:
        for i, name in enumerate(names):
            _, top, x1, bottom = draw.textbbox((0, 0), name, font=font)
            y = title_h + pad + i * (cell + pad) + (cell - (bottom + top)) // 2  # centred on the row
            draw.text((label_w - 2 * pad - int(math.ceil(x1)), y), name, fill=ink, font=font)
    return canvas
