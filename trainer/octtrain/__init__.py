"""octtrain: the training job behind octd's models (PyTorch; runs on CPU or GPU)."""

__version__ = "0.1.0"
