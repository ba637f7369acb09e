"""Temperature scaling (Guo et al. 2017): one scalar T, fitted by minimising the negative
log-likelihood of held-out logits, divides the logits. It changes no answer (the argmax is the
same), only how sure the model says it is; the exported model applies it (its `logits` output
is already divided by T), so the edge needs nothing new to use it.
"""

from __future__ import annotations

import numpy as np


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """argmin_T NLL(logits / T), by golden-section search on log T (NLL is unimodal in it);
    deterministic, no optimiser state."""
    if len(y) == 0:
        return 1.0
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll(logits, y, np.exp(c)), _nll(logits, y, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll(logits, y, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll(logits, y, np.exp(d))
    return float(np.exp((a + b) / 2))


def cross_fitted(logits: np.ndarray, y: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each fold's logits divided by the temperature fitted on the other folds, so that the
    calibrated figures are measured on data the temperature never saw."""
    out = np.empty_like(logits)
    temps = []
    for k in np.unique(folds):
        held = folds == k
        t = fit_temperature(logits[~held], y[~held])
        temps.append(t)
        out[held] = logits[held] / t
    return out, temps
