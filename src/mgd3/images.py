"""Image files from outside (real-data folders, distilled sets), read with a budget: the size in
the header is checked before a single pixel is decoded, so a 76 KB PNG that claims 40 000 000 x 1
pixels (which the shorter-side resize would blow up to 10 G pixels) or a decompression bomb is
one line, not an allocation failure. PIL's own two-line `DecompressionBombWarning` is silenced: the
budget (below PIL's limit) says it first.

`image_problem` decodes a file's pixels (a JPEG is checked for its end-of-image marker instead:
decoding ImageNet's 1.28 M JPEGs would take hours, see benchmarks/results/fingerprint_cost.md),
so a broken zlib stream or a truncated JPEG is found by the check that skips unusable files, not
halfway through encoding.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch

from mgd3 import safeio
from mgd3.errors import Mgd3Error

MAX_PIXELS = 8192 * 8192  # pixels of one image file (ImageNet's largest photos are ~ 20 M)
MAX_RESIZED_PIXELS = 1 << 26  # pixels of one image after its shorter side is resized to the resolution


def _why(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}{': ' + msg[:200] if msg else ''}"


def check_size(w: int, h: int, name: str, resolution: int | None = None, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image whose pixels, or whose pixels once resized to `resolution` on its shorter
    side, pass the budget (checked from the header, before decoding)."""
    if w < 1 or h < 1:
        raise Mgd3Error(f"{name} is {w}x{h} pixels: an empty image")
    if w * h > max_pixels:
        raise Mgd3Error(f"{name} is {w}x{h} pixels, more than mgd3 reads ({max_pixels} pixels per image)")
    if resolution is not None and resolution * resolution * (max(w, h) / min(w, h)) > MAX_RESIZED_PIXELS:
        raise Mgd3Error(f"{name} is {w}x{h} pixels: resized to {resolution} on its shorter side it would be "
                        f"{resolution}x{resolution * max(w, h) // min(w, h)}, more than mgd3 allocates for one image")


@contextlib.contextmanager
def open_image(path: str | os.PathLike, resolution: int | None = None, max_pixels: int = MAX_PIXELS):
    """`PIL.Image.open` of a regular file whose header size is within the budget (`check_size`);
    anything PIL refuses or warns about is an `Mgd3Error` naming the file."""
    from PIL import Image

    name = f"image {path}"
    safeio.check_regular(path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_size says it, in one line
        try:
            im = Image.open(path)
        except Mgd3Error:
            raise
        except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, DecompressionBomb*)
            raise Mgd3Error(f"cannot read {name}: {_why(e)}") from None
        with im:
            check_size(*im.size, name, resolution, max_pixels)
            yield im


def read_image(path: str | os.PathLike, channels: int, resolution: int | None = None) -> torch.Tensor:
    """An image file as uint8 (channels, H, W) (PIL does the channel conversion), within the budget."""
    from PIL import Image

    with open_image(path, resolution) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget was checked
        try:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
        except Exception as e:  # noqa: BLE001  (a damaged pixel stream: zlib, truncated JPEG, ...)
            raise Mgd3Error(f"cannot read image {path}: {_why(e)}") from None
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).copy()).permute(2, 0, 1)


def image_problem(path: str | os.PathLike, resolution: int | None = None) -> str | None:
    """Why an image file cannot be used (missing, not a regular file, not an image, over the
    budget, damaged pixel data, a JPEG cut short), or None."""
    if not os.path.lexists(path) or not os.path.exists(path):
        return "missing"
    try:
        with open_image(path, resolution) as im:
            im.verify()
        with open_image(path, resolution) as im:  # verify() leaves the image unusable: open again
            if im.format == "JPEG":  # decoding costs ~10 ms: a truncated file lacks its end-of-image marker
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 1024))
                    if b"\xff\xd9" not in f.read():
                        return "truncated JPEG (no end-of-image marker)"
            else:
                im.load()  # PNG and the rest: the whole pixel stream (a broken zlib stream)
    except Mgd3Error as e:
        return str(e).removeprefix(f"cannot read image {path}: ")
    except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, zlib.error, ...)
        return _why(e)
    return None
