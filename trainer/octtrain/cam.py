"""Give an exported model its class activation maps as a second output, by graph surgery.

For a model exported before octtrain wrote the `cam` output itself (the shipped default
model 0.2.0): the last feature map before global average pooling, through the classifier's
own weights as a 1x1 convolution, is exactly what `WithActivationMaps` exports for a newly
trained model. The logits are untouched (checked: same bytes of output on sample inputs).

    python -m octtrain.cam IN_MODEL_DIR OUT_MODEL_DIR [--version V]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def add_activation_maps(model_path: Path, out_path: Path) -> None:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    if any(o.name == "cam" for o in graph.output):
        raise SystemExit(f"{model_path} already has a cam output")
    pools = [n for n in graph.node if n.op_type == "GlobalAveragePool"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    if len(pools) != 1 or len(gemms) != 1:
        raise SystemExit("expected one global average pooling and one linear classifier")
    features, gemm = pools[0].input[0], gemms[0]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    weight = inits[gemm.input[1]] * attrs.get("alpha", 1.0)
    if not attrs.get("transB", 0):
        weight = weight.T
    bias = inits[gemm.input[2]] * attrs.get("beta", 1.0) if len(gemm.input) > 2 else np.zeros(weight.shape[0])
    classes, channels = weight.shape
    graph.initializer.extend([
        numpy_helper.from_array(weight.reshape(classes, channels, 1, 1).astype(np.float32), "cam_weight"),
        numpy_helper.from_array(bias.astype(np.float32), "cam_bias"),
    ])
    graph.node.append(helper.make_node("Conv", [features, "cam_weight", "cam_bias"], ["cam"], name="cam"))
    graph.output.append(helper.make_tensor_value_info("cam", onnx.TensorProto.FLOAT, ["batch", classes, "h", "w"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def check(before: Path, after: Path) -> float:
    """Max |logits before - logits after| and |mean(cam) - logits| on random inputs."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(before), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(after), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 2 for d in a.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    (ref,) = a.run(None, {a.get_inputs()[0].name: x})[:1]
    logits, cam = b.run(None, {b.get_inputs()[0].name: x})
    return float(max(np.abs(ref - logits).max(), np.abs(cam.mean(axis=(2, 3)) - logits).max()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="octtrain.cam", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--version", help="the new model's version (default: unchanged)")
    args = ap.parse_args(argv)
    src, out = Path(args.model_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())
    model_file = manifest.get("model_file", "model.onnx")
    for f in src.iterdir():
        if f.is_file() and f.name not in ("manifest.json", model_file):
            shutil.copy2(f, out / f.name)
    add_activation_maps(src / model_file, out / model_file)
    diff = check(src / model_file, out / model_file)
    if diff > 1e-4:
        raise SystemExit(f"the activation maps do not reproduce the logits (max diff {diff})")
    manifest["sha256"] = hashlib.sha256((out / model_file).read_bytes()).hexdigest()
    manifest["heatmap"] = {"output": "cam", "kind": "class_activation"}
    if args.version:
        manifest["version"] = args.version
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"out": str(out), "max_abs_diff": diff, "sha256": manifest["sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
