"""octtrain: the training job behind octd's models (PyTorch; runs on CPU or GPU)."""

import os

# Microsoft's onnxruntime wheels (1.29 and later) keep a device id and queue usage events for
# upload under ~/.cache/Microsoft; one event is logged as the runtime starts, before any API
# switch can act. Training on clinic data says nothing to anyone it was not told to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
