import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from octtrain.preprocess import preprocess, resize_bilinear, to_grey01


def test_resize_matches_pytorch_bilinear_half_pixel():
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((496, 512), (224, 224)), ((37, 91), (64, 50)), ((10, 10), (10, 10))]:
        x = rng.random((h, w), dtype=np.float32)
        ours = resize_bilinear(x, oh, ow)
        ref = F.interpolate(torch.from_numpy(x)[None, None], size=(oh, ow), mode="bilinear",
                            align_corners=False, antialias=False)[0, 0].numpy()
        assert np.abs(ours - ref).max() < 1e-5


def test_grey_conversions():
    assert to_grey01(Image.new("L", (2, 2), 255)).max() == 1.0
    rgb = to_grey01(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert abs(float(rgb[0, 0]) - 0.299) < 1e-6
    g16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_grey01(g16).max() == 1.0


def test_preprocess_shape_and_normalisation():
    spec = {"height": 8, "width": 4, "channels": 3, "mean": [0.5], "std": [0.25]}
    out = preprocess(Image.new("L", (20, 10), 255), spec)
    assert out.shape == (3, 8, 4) and out.dtype == np.float32
    assert np.allclose(out, 2.0)
