"""octtrain: the training job behind octd's models (PyTorch; runs on CPU or GPU)."""

import os

# onnxruntime builds with telemetry compiled in (Microsoft's wheels, 1.29 and later) keep a
# device id and queue usage events for upload under ~/.cache/Microsoft; one event is logged as
# the runtime starts (on import), before any API switch can act. Training on clinic data says
# nothing to anyone it was not told to, whatever the environment it inherited says.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
