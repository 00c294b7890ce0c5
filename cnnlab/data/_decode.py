"""Image decoding and resizing with Pillow (numpy + PIL only)."""

from __future__ import annotations

import numpy as np
from PIL import Image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def to_rgb(im: Image.Image) -> Image.Image:
    """Converts any Pillow mode to RGB.

    Grayscale (``L``, ``1``, ``I``, ``F``, ``I;16``) is replicated to three channels; ``CMYK``
    and ``YCbCr`` use Pillow's conversion; palette images go through RGBA; alpha is dropped
    (as ``cv2.imread`` does), not composited.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257.0 if arr.max() <= 65535 else arr * (255.0 / arr.max())
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


def resize_image(
    im: Image.Image,
    height: int,
    width: int,
    mode: str = "stretch",
    resample: str = "bilinear",
    pad_value: int = 0,
) -> Image.Image:
    """Resizes an RGB image to ``(height, width)``.

    ``stretch`` ignores the aspect ratio (like ``cv2.resize(img, (w, h))``); ``crop`` scales the
    shorter side to fit and center-crops; ``pad`` scales the longer side to fit and letterboxes
    with ``pad_value``.
    """
    filt = _RESAMPLE[resample]
    w0, h0 = im.size
    if (w0, h0) == (width, height):
        return im
    if mode == "stretch":
        return im.resize((width, height), filt)
    if mode == "crop":
        scale = max(width / w0, height / h0)
        cw, ch = width / scale, height / scale  # source box size
        left, top = (w0 - cw) / 2.0, (h0 - ch) / 2.0
        return im.resize((width, height), filt, box=(left, top, left + cw, top + ch))
    if mode == "pad":
        scale = min(width / w0, height / h0)
        nw = max(1, min(width, round(w0 * scale)))
        nh = max(1, min(height, round(h0 * scale)))
        small = im.resize((nw, nh), filt)
        canvas = Image.new("RGB", (width, height), (pad_value, pad_value, pad_value))
        canvas.paste(small, ((width - nw) // 2, (height - nh) // 2))
        return canvas
    raise ValueError(f"resize: unknown mode {mode!r}")


def load_image(
    path: str,
    height: int,
    width: int,
    mode: str = "stretch",
    resample: str = "bilinear",
    pad_value: int = 0,
    fast_decode: bool = False,
) -> np.ndarray:
    """Decodes ``path`` to a uint8 RGB array ``[height, width, 3]``.

    Raises an ``OSError`` (or a Pillow error) for unreadable or truncated files: Pillow's
    ``LOAD_TRUNCATED_IMAGES`` stays off, so a truncated JPEG is an error, not a grey tail.
    With ``fast_decode`` the JPEG decoder may downscale by 1/2..1/8 while decoding (Pillow's
    ``draft``), which is faster for large images but not bit-identical.
    """
    with Image.open(path) as im:
        if fast_decode and im.format == "JPEG":
            im.draft("RGB", (width, height))  # keeps both sides >= the target
        im.load()
        rgb = to_rgb(im)
        out = resize_image(rgb, height, width, mode, resample, pad_value)
        arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (height, width, 3):  # pragma: no cover - defensive
        raise OSError(f"decoded to unexpected shape {arr.shape}")
    return arr
