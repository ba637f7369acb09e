"""A whole (tiny) training job: SinGAN on, comparison, CV, report, export — and the edge
loads what it wrote."""

import json
import shutil
import subprocess

import numpy as np
from PIL import Image

from conftest import REPO
from octtrain.train import main


def _dataset(root):
    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, 48)[:, None]
    for ci, cls in enumerate(["CNV", "DME", "DRUSEN", "NORMAL"]):
        for p in range(5 if cls == "CNV" else 3):
            band = np.exp(-((y - 0.3 - 0.1 * ci) ** 2) / 0.005)
            img = (0.15 + 0.6 * band) * rng.gamma(20, 1 / 20, (48, 64))
            path = root / cls / f"{cls}-{ci}{p}{p}-1.jpeg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def test_tiny_training_job_end_to_end(tmp_path):
    _dataset(tmp_path / "data")
    out = tmp_path / "model"
    main(["--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "2", "--batch", "4",
          "--singan", "on", "--singan-iterations", "2", "--singan-images", "1", "--cv", "2",
          "--bootstrap", "50", "--ood", str(tmp_path / "data" / "NORMAL")])
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "evaluation.json").read_text())
    assert manifest["training"]["singan"] is True
    assert manifest["training"]["synthetic"] == report["comparison"]["synthetic"]["synthetic_total"]
    assert report["split"]["grouped_by"] == "patient"
    assert set(report["comparison"]) >= {"with_singan", "without_singan"}
    assert report["cross_validation"]["pooled"]["n"] == 14
    assert "ci95" in report["test"]["accuracy"]
    assert report["ood"]["images"] == 3
    assert all((out / f).exists() for f in report["figures"])
    assert manifest["export_parity_max_abs_diff"] < 1e-4
    octd = REPO / "target" / "debug" / "octd"
    if octd.exists() or shutil.which("cargo"):
        if not octd.exists():
            subprocess.run(["cargo", "build", "-q", "--bin", "octd"], cwd=REPO, check=True)
        image = next((tmp_path / "data" / "DME").iterdir())
        res = subprocess.run([octd, "classify", image, "--model", out, "--json"], capture_output=True, text=True,
                             check=True)
        line = json.loads(res.stdout)
        assert line["model"]["sha256"] == manifest["sha256"]
        assert line["label"] in manifest["classes"]
