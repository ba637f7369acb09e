import numpy as np

from octtrain.singan import SinGAN, SinGANConfig


def test_tiny_singan_learns_and_samples():
    rng = np.random.default_rng(0)
    # A layered, OCT-like test image: bright bands with speckle.
    y = np.linspace(0, 1, 40, dtype=np.float32)[:, None]
    image = (0.3 + 0.5 * np.exp(-((y - 0.5) ** 2) / 0.01)) * rng.gamma(20, 1 / 20, (40, 48)).astype(np.float32)
    image = np.clip(image, 0, 1)
    cfg = SinGANConfig(max_size=24, min_size=12, channels=8, iterations=15)
    model = SinGAN(cfg, seed=0).fit(image)
    assert len(model.generators) == len(model.reals) >= 3, "a pyramid of scales"
    assert model.reals[-1].shape[-1] == 24
    samples = model.sample(3, seed=1)
    assert len(samples) == 3 and samples[0].shape == tuple(model.reals[-1].shape[-2:])
    assert all(0.0 <= s.min() and s.max() <= 1.0 for s in samples)
    assert not np.allclose(samples[0], samples[1]), "different noise, different samples"
    assert model.reconstruction_error() < 0.25, "the fixed noise map reconstructs the image"
