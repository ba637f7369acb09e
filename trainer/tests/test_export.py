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
    # Every output: the maps and the OOD score (a sum over 1280 features) carry float32 rounding.
    assert manifest["export_parity_max_abs_diff"] < 1e-3


def test_activation_maps_are_exported_and_average_to_the_logits(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(1)
    model = CompactNet(4, 1, width=4).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "cam"]
    x = np.random.default_rng(2).random((3, 1, INPUT["height"], INPUT["width"]), dtype=np.float32)
    logits, cam = sess.run(None, {"input": x})
    assert cam.shape == (3, 4, INPUT["height"] // 32, INPUT["width"] // 32)
    # Global average pooling then the linear layer == the linear layer then the average.
    assert np.abs(cam.mean(axis=(2, 3)) - logits).max() < 1e-4
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(x)).numpy() - logits).max() < 1e-4


def test_surgery_gives_an_older_model_the_same_maps(tmp_path):
    from octtrain.cam import add_activation_maps, check

    torch.manual_seed(3)
    model = CompactNet(4, 1, width=4).eval()
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(model, torch.zeros(1, 1, INPUT["height"], INPUT["width"]), str(plain),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    with_maps = tmp_path / "cam.onnx"
    add_activation_maps(plain, with_maps)
    assert check(plain, with_maps) < 1e-4
    exported = tmp_path / "exported.onnx"
    export_onnx(model, exported)
    import onnxruntime as ort

    x = np.random.default_rng(4).random((2, 1, INPUT["height"], INPUT["width"]), dtype=np.float32)
    a = ort.InferenceSession(str(with_maps), providers=["CPUExecutionProvider"]).run(None, {"input": x})[1]
    b = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, {"input": x})[1]
    assert np.abs(a - b).max() < 1e-4, "surgery and export agree"
