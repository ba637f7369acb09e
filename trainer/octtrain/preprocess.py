"""The one preprocessing definition shared with the edge (src/infer/preprocess.rs).

Both sides must produce the same tensor from the same decoded pixels, so everything here is
plain float32 arithmetic with no library resize: greyscale in [0, 1], bilinear resize with
half-pixel centres (PyTorch ``align_corners=False``, no antialias), then (x - mean) / std.
See docs/model-manifest.md.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_grey01(img: Image.Image) -> np.ndarray:
    """Decoded image -> float32 HxW in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "L":
        arr = np.asarray(img, dtype=np.float32) / 255.0
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        arr = rgb[..., 0] * LUMA[0] + rgb[..., 1] * LUMA[1] + rgb[..., 2] * LUMA[2]
    elif mode == "LA":
        arr = np.asarray(img, dtype=np.float32)[..., 0] / 255.0
    else:
        return to_grey01(img.convert("RGB"))
    return np.ascontiguousarray(arr, dtype=np.float32)


def _axis(in_size: int, out_size: int):
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear, half-pixel centres, no antialias; float32 throughout."""
    in_h, in_w = x.shape
    y0, y1, ly = _axis(in_h, out_h)
    x0, x1, lx = _axis(in_w, out_w)
    ly = ly[:, None]
    lx = lx[None, :]
    top = x[y0][:, x0] * (np.float32(1) - lx) + x[y0][:, x1] * lx
    bottom = x[y1][:, x0] * (np.float32(1) - lx) + x[y1][:, x1] * lx
    return (top * (np.float32(1) - ly) + bottom * ly).astype(np.float32)


def preprocess(img: Image.Image, manifest_input: dict) -> np.ndarray:
    """Image -> CxHxW float32, exactly as the edge does it."""
    grey = to_grey01(img)
    resized = resize_bilinear(grey, manifest_input["height"], manifest_input["width"])
    mean = np.float32(manifest_input["mean"][0])
    std = np.float32(manifest_input["std"][0])
    norm = ((resized - mean) / std).astype(np.float32)
    return np.repeat(norm[None, :, :], manifest_input["channels"], axis=0)
