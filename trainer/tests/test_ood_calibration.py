"""The OOD scores, the temperature and the exported third output."""

import numpy as np
import pytest
import torch

from octtrain.calibration import cross_fitted, fit_temperature
from octtrain.evaluate import ece, softmax
from octtrain.model import CompactNet
from octtrain.ood import METHODS, Knn, Mahalanobis, energy, fit_scorer, threshold_for_rate
from octtrain.train import INPUT, export_onnx, onnx_parity


def _clusters(rng, n=40, d=64):
    """Four tight classes in d dimensions, fewer samples than dimensions (as with real data)."""
    centres = rng.normal(0, 4, (4, d))
    labels = np.repeat(np.arange(4), n // 4)
    return centres, labels, centres[labels] + rng.normal(0, 1, (n, d))


def test_mahalanobis_is_exact_for_its_shrunk_covariance():
    rng = np.random.default_rng(0)
    centres, labels, feats = _clusters(rng)
    m = Mahalanobis().fit(feats, labels)
    assert 0 < m.shrinkage <= 1
    # The low-rank form equals the dense formula with the same shrunk covariance.
    x = feats - m.means[labels]
    cov = x.T @ x / len(x)
    mu = np.trace(cov) / cov.shape[0]
    precision = np.linalg.inv((1 - m.shrinkage) * cov + m.shrinkage * mu * np.eye(cov.shape[0]))
    probe = rng.normal(0, 4, (5, feats.shape[1]))
    dense = np.sqrt(np.min([np.einsum("nd,de,ne->n", probe - c, precision, probe - c) for c in m.means], axis=0))
    assert np.allclose(m.raw(probe), dense, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_score_ranks_far_inputs_above_near_ones_and_the_graph_agrees(method):
    rng = np.random.default_rng(1)
    centres, labels, feats = _clusters(rng)
    near = centres[[0, 1, 2, 3]] + rng.normal(0, 1, (4, feats.shape[1]))
    far = rng.normal(0, 4, (4, feats.shape[1])) * 3
    w = rng.normal(0, 0.1, (4, feats.shape[1]))
    logits = lambda f: f @ w.T  # noqa: E731
    s = fit_scorer(method, feats, labels, logits(feats))
    near_s, far_s = s.score(near, logits(near)), s.score(far, logits(far))
    if method != "energy":  # energy reads logits, which a far input can make large
        assert far_s.min() > near_s.max(), (near_s, far_s)
    head = s.head()
    both = np.concatenate([near, far])
    with torch.no_grad():
        graph = head(torch.tensor(both, dtype=torch.float32), torch.tensor(logits(both), dtype=torch.float32)).numpy()
    assert np.allclose(graph, s.score(both, logits(both)), rtol=1e-3, atol=1e-3)


def test_scores_are_relative_to_the_training_images():
    rng = np.random.default_rng(2)
    _, labels, feats = _clusters(rng)
    m = Mahalanobis().fit(feats, labels)
    assert np.median(m.score(feats)) == pytest.approx(1.0), "the median training image scores 1"
    knn = Knn().fit(feats)
    assert np.allclose(knn.score(feats), 0.0, atol=1e-9), "a training image is its own nearest neighbour"
    assert energy(np.array([[0.0, 0.0]]))[0] == pytest.approx(-np.log(2))


def test_threshold_flags_the_stated_share():
    scores = np.arange(100, dtype=float)
    t = threshold_for_rate(scores, 0.25)
    assert np.mean(scores > t) == pytest.approx(0.25, abs=0.01)


def test_temperature_recovers_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(3)
    n, true_t = 4000, 3.0
    y = rng.integers(0, 4, n)
    calibrated = rng.normal(0, 1, (n, 4)) + 1.5 * np.eye(4)[y]
    # Sample labels from the calibrated model so that it is calibrated by construction.
    p = softmax(calibrated)
    y = np.array([rng.choice(4, p=row) for row in p])
    overconfident = calibrated * true_t
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(true_t, rel=0.1)
    assert ece(softmax(overconfident / t), y) < ece(softmax(overconfident), y) / 2
    folds = np.arange(n) % 4
    fitted, temps = cross_fitted(overconfident, y, folds)
    assert len(temps) == 4 and all(abs(x - true_t) / true_t < 0.15 for x in temps)
    assert (fitted.argmax(1) == overconfident.argmax(1)).all(), "a temperature changes no answer"


def test_export_has_calibrated_logits_and_the_ood_output(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = CompactNet(4, 1, width=4).eval()
    rng = np.random.default_rng(4)
    greys = [rng.random((64, 80), dtype=np.float32) for _ in range(12)]
    from octtrain.fitting import embed

    logits, feats = embed(model, greys)
    scorer = Mahalanobis().fit(feats, np.arange(12) % 4)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, temperature=2.0, ood=scorer.head())
    assert onnx_parity(model, path, greys[:3], 2.0, scorer.head()) < 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "cam", "ood"]
    from octtrain.fitting import tensor_from_grey

    x = np.stack([tensor_from_grey(g) for g in greys[:3]])
    out_logits, cam, ood = sess.run(None, {"input": x})
    assert np.allclose(out_logits, logits[:3] / 2.0, atol=1e-4)
    assert np.allclose(cam.mean(axis=(2, 3)), out_logits, atol=1e-4)
    assert np.allclose(ood, scorer.score(feats[:3]), rtol=1e-3)
    assert INPUT["channels"] == 1
