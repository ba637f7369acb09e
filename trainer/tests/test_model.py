import torch

from octtrain.model import CompactNet, build
from octtrain.train import set_trainable


def test_compact_is_small_and_greyscale():
    model = CompactNet(4, 1)
    params = sum(p.numel() for p in model.parameters())
    assert params < 500_000
    assert model(torch.zeros(2, 1, 224, 224)).shape == (2, 4)


def test_xception_greyscale_with_only_the_last_block_trainable():
    model = build("xception", 4, 1)
    set_trainable(model, "xception", "block14")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"conv3", "bn3", "conv4", "bn4", "fc"}
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 96, 96)).shape == (1, 4)
