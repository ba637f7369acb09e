import hashlib
import json

import numpy as np
import onnx
import torch

from conftest import REPO
from octtrain.model import CompactNet
from octtrain.train import INPUT, export_onnx, onnx_parity


def test_export_is_opset17_dynamic_batch_with_parity(tmp_path):
    torch.manual_seed(0)
    model = CompactNet(4, 1, width=4)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "batch dimension is dynamic"
    rng = np.random.default_rng(0)
    greys = [rng.random((64, 80), dtype=np.float32) for _ in range(3)]
    assert onnx_parity(model, path, greys) < 1e-4


def test_committed_default_model_matches_its_manifest():
    manifest = json.loads((REPO / "models/default/manifest.json").read_text())
    digest = hashlib.sha256((REPO / "models/default/model.onnx").read_bytes()).hexdigest()
    assert manifest["sha256"] == digest
    assert manifest["classes"] == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert manifest["input"] == {**INPUT, **manifest["input"]}
    assert manifest["export_parity_max_abs_diff"] < 1e-4
