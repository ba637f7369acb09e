"""How unlike its training data an input is, from the model itself.

Three scores, all "higher = less like training", compared in `octtrain.study`:

- `energy`: minus the log-sum-exp of the logits (Liu et al. 2020). Free, but it reads the same
  logits that are confidently wrong on a condition the model never learned.
- `mahalanobis`: the distance of the pooled penultimate features to the nearest class mean
  under one shared covariance (Lee et al. 2018), with Ledoit-Wolf shrinkage because there are
  far fewer training images than feature dimensions.
- `knn`: one minus the cosine similarity to the nearest training image's features (Sun et al.
  2022).

Distances are divided by the median of the training images' own distances, so that a threshold
chosen on cross-validated folds carries over to a model trained on every image: each model is
measured against its own training set in the same way. The exported model computes the chosen
score as a third output (`OodHead`), so the edge reads it from the same inference call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

METHODS = ("energy", "mahalanobis", "knn")


def energy(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))


class Mahalanobis:
    """Tied-covariance Mahalanobis distance to the nearest class mean, Ledoit-Wolf shrunk.

    The precision of (1 - a) S + a mu I is kept as its low-rank form: S has rank at most the
    number of training images, so the score is ||f - m||^2 / (a mu) minus a correction along S's
    few principal directions, which is small enough to put in the exported graph.
    """

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "Mahalanobis":
        f = features.astype(np.float64)
        classes = np.unique(labels)
        self.means = np.stack([f[labels == c].mean(axis=0) for c in classes])
        x = f - self.means[np.searchsorted(classes, labels)]
        n, d = x.shape
        cov = x.T @ x / n
        mu = np.trace(cov) / d
        if not mu > 0:
            raise ValueError("the training features do not vary within classes: no covariance to measure by")
        delta = (np.sum(cov * cov) - d * mu * mu) / d
        beta = (np.sum(np.sum(x * x, axis=1) ** 2) / n - np.sum(cov * cov)) / (n * d)
        self.shrinkage = float(min(beta, delta) / delta) if delta > 0 else 1.0
        if n < d:
            # Eigenvectors of the n x n Gram matrix give those of the d x d covariance cheaply.
            values, vectors = np.linalg.eigh(x @ x.T / n)
            keep = values > values.max() * 1e-9
            values, vectors = values[keep], vectors[:, keep]
            directions = (x.T @ vectors) / np.sqrt(values * n)  # d x k, orthonormal columns
        else:
            values, directions = np.linalg.eigh(cov)
            keep = values > values.max() * 1e-9
            values, directions = values[keep], directions[:, keep]
        iso = self.shrinkage * mu
        shrunk = (1 - self.shrinkage) * values + iso
        self.scale = 1.0 / iso
        self.directions = directions.T  # k x d
        self.weights = 1.0 / iso - 1.0 / shrunk  # >= 0
        self.reference = max(float(np.median(self.raw(f))), 1e-12)
        return self

    def raw(self, features: np.ndarray) -> np.ndarray:
        f = features.astype(np.float64)
        best = np.full(len(f), np.inf)
        for m in self.means:
            diff = f - m
            proj = diff @ self.directions.T
            d2 = self.scale * np.sum(diff * diff, axis=1) - np.sum(self.weights * proj * proj, axis=1)
            best = np.minimum(best, d2)
        return np.sqrt(np.maximum(best, 0.0))

    def score(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        return self.raw(features) / self.reference

    def head(self) -> nn.Module:
        return _MahalanobisHead(self)


class Knn:
    """One minus the cosine similarity to the nearest training image."""

    #: The bank goes into the exported graph: a large training set is subsampled to this.
    MAX_BANK = 4096

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None, seed: int = 0) -> "Knn":
        if len(features) < 2:
            raise ValueError("the nearest-neighbour score needs at least two training images")
        if len(features) > self.MAX_BANK:
            keep = np.random.default_rng(seed).choice(len(features), self.MAX_BANK, replace=False)
            features = features[np.sort(keep)]
        self.bank = _unit(features.astype(np.float64))
        # A training image's nearest neighbour is itself: its reference is the second nearest.
        sims = self.bank @ self.bank.T
        np.fill_diagonal(sims, -np.inf)
        self.reference = max(float(np.median(1.0 - sims.max(axis=1))), 1e-12)
        return self

    def score(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        sims = _unit(features.astype(np.float64)) @ self.bank.T
        return (1.0 - sims.max(axis=1)) / self.reference

    def head(self) -> nn.Module:
        return _KnnHead(self)


class Energy:
    def fit(self, features: np.ndarray, labels: np.ndarray | None = None, logits: np.ndarray | None = None) -> "Energy":
        self.reference = float(np.median(energy(logits))) if logits is not None else 0.0
        return self

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return energy(logits) - self.reference

    def head(self) -> nn.Module:
        return _EnergyHead(self.reference)


def scorer(method: str):
    return {"energy": Energy, "mahalanobis": Mahalanobis, "knn": Knn}[method]()


def fit_scorer(method: str, features: np.ndarray, labels: np.ndarray, logits: np.ndarray):
    s = scorer(method)
    if method == "energy":
        return s.fit(features, labels, logits)
    return s.fit(features, labels)


def threshold_for_rate(in_distribution: np.ndarray, rate: float) -> float:
    """The score above which `rate` of in-distribution inputs fall (higher = flagged)."""
    return float(np.quantile(in_distribution, 1.0 - rate))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class _MahalanobisHead(nn.Module):
    def __init__(self, m: Mahalanobis):
        super().__init__()
        self.register_buffer("means", torch.tensor(m.means, dtype=torch.float32))
        self.register_buffer("directions", torch.tensor(m.directions, dtype=torch.float32))
        self.register_buffer("weights", torch.tensor(m.weights, dtype=torch.float32))
        self.scale = float(m.scale)
        self.reference = float(m.reference)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        diff = features[:, None, :] - self.means[None, :, :]  # batch x classes x d
        proj = diff @ self.directions.T  # batch x classes x k
        d2 = self.scale * (diff * diff).sum(-1) - (self.weights * proj * proj).sum(-1)
        return torch.sqrt(torch.clamp(d2.min(dim=1).values, min=0.0)) / self.reference


class _KnnHead(nn.Module):
    def __init__(self, k: Knn):
        super().__init__()
        self.register_buffer("bank", torch.tensor(k.bank, dtype=torch.float32))
        self.reference = float(k.reference)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        unit = features / torch.clamp(features.norm(dim=1, keepdim=True), min=1e-12)
        return (1.0 - (unit @ self.bank.T).max(dim=1).values) / self.reference


class _EnergyHead(nn.Module):
    def __init__(self, reference: float):
        super().__init__()
        self.reference = reference

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(logits, dim=1) - self.reference
