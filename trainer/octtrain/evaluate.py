"""Honest evaluation: metrics with 95 % bootstrap confidence intervals, calibration, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC; NaN when a class is absent."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def wilson(k: int, n: int) -> list[float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def point_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    pred = probs.argmax(1)
    out = {"accuracy": float(np.mean(pred == y)), "ece": ece(probs, y)}
    f1s = []
    for i, c in enumerate(classes):
        tp = np.sum((pred == i) & (y == i))
        fn = np.sum((pred != i) & (y == i))
        fp = np.sum((pred == i) & (y != i))
        tn = np.sum((pred != i) & (y != i))
        sens = tp / (tp + fn) if tp + fn else float("nan")
        spec = tn / (tn + fp) if tn + fp else float("nan")
        prec = tp / (tp + fp) if tp + fp else 0.0
        f1 = 2 * prec * sens / (prec + sens) if (prec + sens) and not np.isnan(sens) else 0.0
        f1s.append(f1)
        out[f"sensitivity_{c}"] = float(sens)
        out[f"specificity_{c}"] = float(spec)
        out[f"auc_{c}"] = _auc(probs[:, i], y == i)
    out["macro_f1"] = float(np.mean(f1s))
    return out


def with_bootstrap(probs: np.ndarray, y: np.ndarray, classes: list[str], rounds: int = 1000, seed: int = 0) -> dict:
    """Each metric as {value, ci95: [lo, hi]} from a percentile bootstrap over images."""
    point = point_metrics(probs, y, classes)
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in point}
    for _ in range(rounds):
        idx = rng.integers(0, len(y), len(y))
        for k, v in point_metrics(probs[idx], y[idx], classes).items():
            samples[k].append(v)
    result = {}
    for k, v in point.items():
        s = np.array(samples[k], dtype=float)
        s = s[~np.isnan(s)]
        ci = [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if len(s) else [None, None]
        result[k] = {"value": None if np.isnan(v) else v, "ci95": ci}
    result["n"] = int(len(y))
    result["confusion_matrix"] = [[int(np.sum((y == i) & (probs.argmax(1) == j))) for j in range(len(classes))]
                                  for i in range(len(classes))]
    return result


def plots(probs: np.ndarray, y: np.ndarray, classes: list[str], out: Path, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cm = np.array([[np.sum((y == i) & (probs.argmax(1) == j)) for j in range(len(classes))] for i in range(len(classes))])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion ({tag}, n={len(y)})")
    fig.tight_layout()
    files.append(f"confusion_{tag}.png")
    fig.savefig(out / files[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    for i, c in enumerate(classes):
        pos = y == i
        if pos.any() and (~pos).any():
            thresholds = np.unique(np.concatenate([[np.inf], probs[:, i]]))[::-1]
            tpr = [np.mean(probs[pos, i] >= t) for t in thresholds]
            fpr = [np.mean(probs[~pos, i] >= t) for t in thresholds]
            ax.plot(fpr, tpr, label=f"{c} (AUC {_auc(probs[:, i], pos):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC one-vs-rest ({tag})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(f"roc_{tag}.png")
    fig.savefig(out / files[-1], dpi=100)
    plt.close(fig)

    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, 11)
    mids, accs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            mids.append(conf[m].mean())
            accs.append(correct[m].mean())
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(mids, accs, "o-")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({tag}), ECE {ece(probs, y):.2f}")
    fig.tight_layout()
    files.append(f"reliability_{tag}.png")
    fig.savefig(out / files[-1], dpi=100)
    plt.close(fig)
    return files


def write_report(report: dict, out: Path) -> None:
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
