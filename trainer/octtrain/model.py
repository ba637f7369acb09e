"""Architectures. `compact` is the embedded default: greyscale, ~0.1 GFLOPs at 224x224."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CompactNet(nn.Module):
    """Five conv blocks, global average pooling, one linear layer."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w, stride=2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), nn.MaxPool2d(2),
            _block(4 * w, 8 * w), nn.MaxPool2d(2),
            _block(8 * w, 8 * w), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                                  nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    if arch == "compact":
        return CompactNet(num_classes, in_channels)
    if arch == "xception":
        import timm  # only needed for the production architecture

        return timm.create_model("xception", pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels)
    raise ValueError(f"unknown architecture {arch!r}")


class WithActivationMaps(nn.Module):
    """The classifier with a second output: its class activation maps (Zhou et al. 2016).

    For a network that ends in global average pooling and one linear layer, the map of class
    c is that layer applied at every position of the last feature map:
    cam[c, y, x] = sum_k W[c, k] * f[k, y, x] + b[c], so the mean of cam[c] over positions is
    exactly logit c. No gradients are needed at the edge; the device upsamples the map of the
    predicted class onto the B-scan.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def parts(self):
        m = self.model
        if isinstance(m, CompactNet):
            linear = m.head[-1]
            return m.features, linear
        if hasattr(m, "forward_features") and hasattr(m, "get_classifier"):  # timm (Xception)
            return m.forward_features, m.get_classifier()
        raise ValueError("no class activation maps for this architecture")

    def forward(self, x: torch.Tensor):
        features, linear = self.parts()
        f = features(x)
        logits = linear(f.mean(dim=(2, 3)))
        # A 1x1 convolution with the classifier's weights: the same graph octtrain.cam builds.
        cam = nn.functional.conv2d(f, linear.weight[:, :, None, None], linear.bias)
        return logits, cam
