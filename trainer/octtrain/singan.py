"""SinGAN (Shaham, Dekel, Michaeli, ICCV 2019), written for this project.

One generator/discriminator pair per scale of a single image's pyramid, trained coarse to
fine: WGAN-GP adversarial loss plus a reconstruction loss that makes a fixed noise map
reproduce the image. New samples start from fresh noise at the coarsest scale.

Scale is configurable so a small run takes seconds per image on a laptop CPU
(`SinGANConfig.small()`) and a full one runs on a GPU (`SinGANConfig.full()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SinGANConfig:
    max_size: int = 128       # longest side of the finest scale
    min_size: int = 25        # longest side of the coarsest scale
    scale_factor: float = 0.75
    channels: int = 32
    iterations: int = 2000    # per scale
    steps_d: int = 3
    steps_g: int = 3
    lr: float = 5e-4
    alpha: float = 10.0       # reconstruction weight
    gp_weight: float = 0.1
    noise_amp: float = 0.1

    @staticmethod
    def small() -> "SinGANConfig":
        return SinGANConfig(max_size=64, min_size=20, channels=16, iterations=60)

    @staticmethod
    def full() -> "SinGANConfig":
        return SinGANConfig()


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


class _Net(nn.Module):
    """Five 3x3 conv blocks, as in the paper (receptive field 11x11)."""

    def __init__(self, channels: int, out_channels: int, tanh: bool):
        super().__init__()
        self.body = nn.Sequential(_block(1, channels), _block(channels, channels), _block(channels, channels),
                                  _block(channels, channels), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.tanh = tanh

    def forward(self, x):
        y = self.body(x)
        return torch.tanh(y) if self.tanh else y


def _pyramid(image: np.ndarray, cfg: SinGANConfig) -> list[torch.Tensor]:
    """Grey image in [0, 1] -> tensors in [-1, 1], coarsest first."""
    x = torch.from_numpy(image.astype(np.float32))[None, None] * 2 - 1
    h, w = x.shape[-2:]
    top = cfg.max_size / max(h, w)
    n = max(1, int(math.ceil(math.log(cfg.min_size / cfg.max_size) / math.log(cfg.scale_factor))) + 1)
    scales = []
    for i in range(n):
        s = top * cfg.scale_factor ** (n - 1 - i)
        size = (max(8, round(h * s)), max(8, round(w * s)))
        scales.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True))
    return scales


def _gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    eps = torch.rand(1, 1, 1, 1)
    mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad = torch.autograd.grad(d(mix).sum(), mix, create_graph=True)[0]
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class SinGAN:
    def __init__(self, cfg: SinGANConfig, device: str = "cpu", seed: int = 0):
        self.cfg = cfg
        self.device = device
        self.seed = seed
        self.generators: list[nn.Module] = []
        self.noise_amps: list[float] = []
        self.reals: list[torch.Tensor] = []
        self.z_rec: torch.Tensor | None = None

    def _upsample(self, x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def _generate(self, upto: int, noises: list[torch.Tensor]) -> torch.Tensor:
        x = torch.zeros_like(self.reals[0])
        for i in range(upto + 1):
            if i > 0:
                x = self._upsample(x, self.reals[i])
            z = noises[i] * self.noise_amps[i]
            x = self.generators[i](x + z) + x
        return x

    def fit(self, image: np.ndarray) -> "SinGAN":
        torch.manual_seed(self.seed)
        cfg = self.cfg
        self.reals = [r.to(self.device) for r in _pyramid(image, cfg)]
        self.z_rec = torch.randn_like(self.reals[0])
        for n, real in enumerate(self.reals):
            g = _Net(cfg.channels, 1, tanh=True).to(self.device)
            d = _Net(cfg.channels, 1, tanh=False).to(self.device)
            if n > 0 and (n - 1) < len(self.generators):
                # Warm start from the previous scale, as the paper does.
                g.load_state_dict(self.generators[-1].state_dict())
            opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
            opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
            if n == 0:
                prev_rec = torch.zeros_like(real)
                amp = 1.0
            else:
                with torch.no_grad():
                    prev_rec = self._upsample(self._reconstruct(n - 1), real)
                amp = cfg.noise_amp * float(torch.sqrt(F.mse_loss(prev_rec, real)))
            self.generators.append(g)
            self.noise_amps.append(amp)
            for _ in range(cfg.iterations):
                noises = [torch.randn_like(r) for r in self.reals[: n + 1]]
                with torch.no_grad():
                    prev = self._generate(n - 1, noises) if n > 0 else torch.zeros_like(real)
                    prev = self._upsample(prev, real) if n > 0 else prev
                for _ in range(cfg.steps_d):
                    fake = g(prev + noises[n] * amp) + prev
                    loss_d = d(fake.detach()).mean() - d(real).mean()
                    loss_d = loss_d + cfg.gp_weight * _gradient_penalty(d, real, fake.detach())
                    opt_d.zero_grad()
                    loss_d.backward()
                    opt_d.step()
                for _ in range(cfg.steps_g):
                    fake = g(prev + noises[n] * amp) + prev
                    z_rec = self.z_rec if n == 0 else torch.zeros_like(real)
                    rec = g(prev_rec + z_rec * amp) + prev_rec
                    loss_g = -d(fake).mean() + cfg.alpha * F.mse_loss(rec, real)
                    opt_g.zero_grad()
                    loss_g.backward()
                    opt_g.step()
            g.eval()
        return self

    def _reconstruct(self, upto: int) -> torch.Tensor:
        noises = [self.z_rec] + [torch.zeros_like(r) for r in self.reals[1:]]
        return self._generate(upto, noises)

    @torch.no_grad()
    def sample(self, count: int, seed: int = 1) -> list[np.ndarray]:
        """New images (grey, [0, 1], finest-scale size) drawn from noise."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            noises = [torch.randn(r.shape, generator=gen).to(self.device) for r in self.reals]
            x = self._generate(len(self.reals) - 1, noises)
            out.append(((x[0, 0].clamp(-1, 1) + 1) / 2).cpu().numpy().astype(np.float32))
        return out

    @torch.no_grad()
    def reconstruction_error(self) -> float:
        """RMSE (in [0, 1] units) of the fixed-noise reconstruction at the finest scale."""
        rec = self._reconstruct(len(self.reals) - 1)
        return float(torch.sqrt(F.mse_loss(rec, self.reals[-1]))) / 2
