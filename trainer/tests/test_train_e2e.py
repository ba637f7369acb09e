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
    assert report["cross_validation"]["cv"]["n"] == 14
    assert "ci95" in report["test"]["accuracy"]
    assert report["ood"]["images"] == 3
    assert manifest["ood"]["output"] == "ood" and np.isfinite(manifest["ood"]["threshold"])
    assert manifest["calibration"]["temperature"] > 0
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
        assert "unlike_training_score" in line, "the edge reads the model's ood output"


def test_fit_on_all_takes_figures_temperature_and_threshold_from_cross_validation(tmp_path):
    _dataset(tmp_path / "data")
    out = tmp_path / "model"
    main(["--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "2", "--batch", "4", "--singan", "off",
          "--fit-on", "all", "--cv", "2", "--bootstrap", "20", "--ood-rate", "0.3"])
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "evaluation.json").read_text())
    cv = report["cross_validation"]
    assert manifest["training"]["real_train_images"] == 14, "the shipped model saw every image"
    assert manifest["metrics"]["measured_on"] == "cross-validation"
    assert manifest["metrics"]["macro_f1"] == cv["cv_calibrated"]["macro_f1"]["value"]
    assert manifest["calibration"]["temperature"] == round(cv["calibration"]["temperature_all_folds"], 6)
    assert manifest["ood"]["threshold"] == round(cv["ood"]["mahalanobis"]["threshold"], 6)
    assert {"confusion_cv.png", "reliability_cv_calibrated.png"} <= set(report["figures"])
