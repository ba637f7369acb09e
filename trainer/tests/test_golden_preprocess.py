"""Cross-language golden test: the same de-identified real image through the Rust
preprocessing (examples/preprocess_dump.rs) and through octtrain.preprocess gives the same
tensor within 1e-5. Catches train/serve skew."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from octtrain.preprocess import preprocess

MODEL = REPO / "models" / "default"


def _binaries():
    octd = REPO / "target" / "debug" / "octd"
    dump = REPO / "target" / "debug" / "examples" / "preprocess_dump"
    if not (octd.exists() and dump.exists()):
        if shutil.which("cargo") is None:
            pytest.skip("the Rust side is not built and cargo is absent")
        subprocess.run(["cargo", "build", "-q", "--bin", "octd", "--example", "preprocess_dump"],
                       cwd=REPO, check=True)
    return octd, dump


def _rust_tensor(dump, image, tmp_path, spec):
    out = tmp_path / f"{image.stem}.bin"
    subprocess.run([dump, image, MODEL, out], check=True)
    return np.fromfile(out, dtype="<f4").reshape(spec["channels"], spec["height"], spec["width"])


def _deidentify(octd, dump, image, tmp_path):
    """The de-identified artefact as lossless pixels: a JPEG, kept byte for byte by octd, is
    written out as PNG of the pixels the edge's decoder gives (PIL's JPEG decoder may differ
    by a grey level, which test_jpeg_decoder_skew_is_small measures on its own)."""
    cfg = tmp_path / "octd.toml"
    cfg.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n')
    out = subprocess.run([octd, "--config", cfg, "deidentify", image, "--out", tmp_path / "deid"],
                         check=True, capture_output=True, text=True)
    artefact = Path(json.loads(out.stdout.splitlines()[0])["output"])
    if artefact.suffix != ".jpg":
        return artefact
    png = artefact.with_suffix(".png")
    subprocess.run([dump, "--png", artefact, png], check=True)
    return png


def test_rust_and_python_preprocessing_agree(shared_oct, tmp_path):
    octd, dump = _binaries()
    spec = json.loads((MODEL / "manifest.json").read_text())["input"]
    images = [sorted((shared_oct / c).iterdir())[0] for c in ("CNV", "DME", "DRUSEN", "NORMAL")]
    # Also the 16-bit and colour paths, made from a real scan.
    grey = np.asarray(Image.open(images[0]).convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "sixteen.png")
    tinted = np.stack([grey, grey // 2, 255 - grey], axis=-1).astype(np.uint8)
    Image.fromarray(tinted, "RGB").save(tmp_path / "colour.png")
    inputs = images + [tmp_path / "sixteen.png", tmp_path / "colour.png"]
    worst = 0.0
    for image in inputs:
        png = _deidentify(octd, dump, image, tmp_path)
        rust = _rust_tensor(dump, png, tmp_path, spec)
        py = preprocess(Image.open(png), spec)
        diff = float(np.abs(rust - py).max())
        worst = max(worst, diff)
        assert diff < 1e-5, f"{image.name}: max |rust - python| = {diff}"
    print(f"golden preprocessing: max abs difference {worst:.3g} over {len(inputs)} images")


def test_jpeg_decoder_skew_is_small(shared_oct, tmp_path):
    """Training decodes JPEG with PIL (libjpeg-turbo), the edge with a pure-Rust decoder.
    They may differ by a grey level; measured here so the skew stays known and small."""
    _, dump = _binaries()
    spec = json.loads((MODEL / "manifest.json").read_text())["input"]
    worst = 0.0
    for image in sorted((shared_oct / "CNV").iterdir())[:5]:
        rust = _rust_tensor(dump, image, tmp_path, spec)
        py = preprocess(Image.open(image), spec)
        worst = max(worst, float(np.abs(rust - py).max()))
    print(f"JPEG decoder skew after preprocessing: {worst:.4f} (normalised units)")
    assert worst < 2.0 / 255 / spec["std"][0] + 1e-6


def test_rust_and_python_agree_on_probabilities_and_the_ood_score(shared_oct, tmp_path):
    """The edge's answer and its `unlike_training_score` are the trainer's: the same
    de-identified scan through octd (tract) and through onnxruntime on octtrain's tensor."""
    import onnxruntime as ort

    from octtrain.evaluate import softmax

    octd, dump = _binaries()
    manifest = json.loads((MODEL / "manifest.json").read_text())
    assert "ood" in manifest, "the default model declares its ood score"
    sess = ort.InferenceSession(str(MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ood_dir = shared_oct.parent / "ood"
    images = [sorted((shared_oct / c).iterdir())[0] for c in ("CNV", "NORMAL")] + sorted(ood_dir.iterdir())[:2]
    for image in images:
        png = _deidentify(octd, dump, image, tmp_path)
        res = subprocess.run([octd, "classify", png, "--model", MODEL, "--json"], capture_output=True, text=True,
                             check=True, env={"OCTD_MODEL__BACKEND": "tract", "PATH": "/usr/bin:/bin"})
        edge = json.loads(res.stdout.splitlines()[0])
        x = preprocess(Image.open(png), manifest["input"])[None]
        out = dict(zip(names, sess.run(None, {"input": x})))
        probs = softmax(out[manifest["output"]["name"]])[0]
        for c, p in zip(manifest["classes"], probs):
            assert abs(edge["probabilities"][c] - p) < 1e-4, f"{image.name} {c}"
        score = float(out[manifest["ood"]["output"]].reshape(-1)[0])
        assert abs(edge["unlike_training_score"] - score) <= 1e-3 * max(1.0, abs(score)), image.name
        unlike = "input_unlike_training" in edge["review_reasons"]
        assert unlike or score <= manifest["ood"]["threshold"], f"{image.name}: above the threshold, not flagged"
