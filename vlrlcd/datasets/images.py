"""Image loading with the checks every record gets: decodes, size limits, EXIF orientation, RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlrlcd.errors import VlrlcdError

DEFAULT_MAX_PIXELS = 40_000_000   # same default as data.max_image_pixels
DEFAULT_MIN_SIDE = 1


class ImageProblem(VlrlcdError):
    """An image that cannot be used; `reason` is the message without the path."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit 'L' by scaling (Pillow's convert would clip)."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a = a.astype(np.float64) / 257.0
    elif im.mode == "I":
        hi = float(a.max()) if a.size else 0.0
        a = a.astype(np.float64) / (257.0 if hi > 255 and hi <= 65535 else max(hi, 255.0) / 255.0)
    else:  # "F"
        hi = float(np.nanmax(a)) if a.size else 0.0
        a = np.nan_to_num(a.astype(np.float64)) * (255.0 if hi <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparent pixels are composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _to_8bit(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Open, check size (before decoding: decompression-bomb guard), decode, apply EXIF orientation, RGB.

    Raises ImageProblem (a VlrlcdError naming the file and the reason) for anything unusable.
    """
    p = Path(path)
    if not p.exists():
        raise ImageProblem(p, "file not found")
    if not p.is_file():
        raise ImageProblem(p, "not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageProblem(
                        p, f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                        "(data.max_image_pixels; a decompression-bomb guard)"
                    )
                if min(w, h) < min_side:
                    raise ImageProblem(
                        p, f"{w}x{h} is too small: each side must be at least {min_side} pixels "
                        "(data.min_image_side)"
                    )
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # a malformed EXIF block: keep the stored orientation
                    pass
                return to_rgb(im).copy()
    except ImageProblem:
        raise
    except Image.DecompressionBombError as e:
        raise ImageProblem(p, f"over Pillow's decompression-bomb limit ({e})") from None
    except UnidentifiedImageError:
        raise ImageProblem(p, "not an image Pillow can read (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            msg = f"truncated or corrupt ({msg})"
        raise ImageProblem(p, f"cannot be decoded: {msg}") from None
