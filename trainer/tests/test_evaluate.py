import numpy as np

from octtrain.evaluate import _auc, ece, plots, point_metrics, with_bootstrap

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


def test_perfect_and_inverted_predictions():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    perfect = np.eye(4)[y] * 0.97 + 0.01
    m = point_metrics(perfect, y, CLASSES)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert all(m[f"auc_{c}"] == 1.0 for c in CLASSES)
    assert m["sensitivity_DME"] == 1.0 and m["specificity_DME"] == 1.0
    assert _auc(np.array([0.1, 0.9]), np.array([True, False])) == 0.0


def test_calibration_error_of_overconfident_model():
    y = np.array([0, 1] * 50)
    p = np.tile([[0.99, 0.01]], (100, 1))
    assert abs(ece(p, y) - 0.49) < 1e-6


def test_bootstrap_intervals_contain_the_estimate(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 60)
    logits = np.eye(4)[y] * 2 + rng.normal(0, 1, (60, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = with_bootstrap(p, y, CLASSES, rounds=200)
    lo, hi = r["accuracy"]["ci95"]
    assert lo <= r["accuracy"]["value"] <= hi and hi - lo > 0
    assert sum(map(sum, r["confusion_matrix"])) == 60
    files = plots(p, y, CLASSES, tmp_path, "test")
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)
