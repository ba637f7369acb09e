"""Patient-grouped cross-validation: every image predicted by a model that never saw its
patient, with each fold model's out-of-distribution scores; and what they say (metrics with
intervals, calibration, OOD flag rates)."""

from __future__ import annotations

import random
import time

import numpy as np

from .calibration import cross_fitted, fit_temperature
from .data import CLASSES
from .evaluate import ece, softmax, with_bootstrap, wilson
from .fitting import IDX, embed, fit, input_spec, synthesize
from .ood import METHODS, fit_scorer, threshold_for_rate


def patient_folds(samples, k: int, seed: int) -> np.ndarray:
    """Fold of each image: patients dealt class by class, so every fold has every class
    that has at least k patients, and no patient is in two folds."""
    by_class: dict[str, list[str]] = {}
    for s in samples:
        if s.patient not in by_class.setdefault(s.label, []):
            by_class[s.label].append(s.patient)
    if k > sum(len(p) for p in by_class.values()):
        raise ValueError(f"{k} folds for {sum(len(p) for p in by_class.values())} patients: every fold needs one")
    rng = random.Random(seed)
    fold_of, turn = {}, 0
    for label in CLASSES:
        patients = sorted(by_class.get(label, []))
        rng.shuffle(patients)
        for p in patients:
            fold_of.setdefault(p, turn % k)
            turn += 1
    return np.array([fold_of[s.patient] for s in samples])


def cross_validate(samples, greys: dict, folds: np.ndarray, args, ood=(), extra=(), log=print) -> dict:
    """One model per fold, trained as `args` says (`args.use_singan`: SinGAN on that fold's
    training images only). Returns, per held-out image, its logits and each OOD method's
    score (the scorer fitted on that fold's training images), and every fold model's logits
    and scores on `ood` and `extra`."""
    inp = input_spec(args.arch)
    k = int(folds.max()) + 1
    ood, extra = list(ood), list(extra)
    logits = np.zeros((len(samples), len(CLASSES)), np.float32)
    scores = {m: np.zeros(len(samples)) for m in METHODS}
    ood_scores = {m: np.zeros((k, len(ood))) for m in METHODS}
    extra_scores = {m: np.zeros((k, len(extra))) for m in METHODS}
    ood_logits = np.zeros((k, len(ood), len(CLASSES)), np.float32)
    seconds = []
    for fold in range(k):
        t0 = time.time()
        train_idx = np.flatnonzero(folds != fold)
        held = np.flatnonzero(folds == fold)
        train = [(greys[samples[i].path], IDX[samples[i].label]) for i in train_idx]
        log(f"cv fold {fold + 1}/{k}: {len(train)} train, {len(held)} held out")
        if getattr(args, "use_singan", False):
            reference = fit(train, [], args, log)
            synthetic, _ = synthesize([samples[i] for i in train_idx], greys, reference, args, log)
            train = train + synthetic
        model = fit(train, [], args, log)
        train_logits, train_feats = embed(model, [greys[samples[i].path] for i in train_idx], inp=inp)
        held_logits, held_feats = embed(model, [greys[samples[i].path] for i in held], inp=inp)
        o_logits, o_feats = embed(model, ood, inp=inp)
        e_logits, e_feats = embed(model, extra, inp=inp)
        labels = np.array([IDX[samples[i].label] for i in train_idx])
        for m in METHODS:
            scorer = fit_scorer(m, train_feats, labels, train_logits)
            scores[m][held] = scorer.score(held_feats, held_logits)
            if ood:
                ood_scores[m][fold] = scorer.score(o_feats, o_logits)
            if extra:
                extra_scores[m][fold] = scorer.score(e_feats, e_logits)
        logits[held] = held_logits
        if ood:
            ood_logits[fold] = o_logits
        seconds.append(time.time() - t0)
        log(f"cv fold {fold + 1}/{k} done in {seconds[-1]:.0f}s")
    return {"logits": logits, "ood_logits": ood_logits, "seconds": np.array(seconds), "folds": folds,
            **{f"score_{m}": scores[m] for m in METHODS},
            **{f"ood_{m}": ood_scores[m] for m in METHODS},
            **{f"extra_{m}": extra_scores[m] for m in METHODS}}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an OOD input > score of an in-distribution one), ties counted half."""
    if len(inside) == 0 or len(outside) == 0:
        return float("nan")
    diff = outside[:, None] - inside[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def summarise(raw: dict, y: np.ndarray, folds: np.ndarray, rate: float, bootstrap: int) -> dict:
    """Metrics with 95 % intervals; ECE before and after a cross-fitted temperature; per OOD
    method the threshold for `rate` on the pooled held-out scores, the in-distribution flag
    rate each fold gets from a threshold chosen on the other folds, and what the fold models
    flag among the OOD scans and the non-OCT inputs."""
    logits = raw["logits"]
    probs = softmax(logits)
    calibrated, temps = cross_fitted(logits, y, folds)
    out = {"cv": with_bootstrap(probs, y, CLASSES, rounds=bootstrap),
           "cv_calibrated": with_bootstrap(softmax(calibrated), y, CLASSES, rounds=bootstrap),
           "calibration": {"ece_before": ece(probs, y),
                           "ece_after_cross_fitted": ece(softmax(calibrated), y),
                           "fold_temperatures": temps,
                           "temperature_all_folds": fit_temperature(logits, y)},
           "seconds_per_fold": float(np.mean(raw["seconds"])), "ood": {}}
    for m in METHODS:
        inside = raw[f"score_{m}"]
        flagged_in = np.zeros(len(y), bool)
        for k in np.unique(folds):
            t = threshold_for_rate(inside[folds != k], rate)
            flagged_in[folds == k] = inside[folds == k] > t
        t_all = threshold_for_rate(inside, rate)
        ood, extra = raw[f"ood_{m}"], raw[f"extra_{m}"]
        n_ood = ood.shape[1]
        # The fold models are not independent judges: the interval is over images, each
        # counted as flagged when most fold models flag it.
        by_most = int(((ood > t_all).mean(axis=0) > 0.5).sum()) if n_ood else 0
        out["ood"][m] = {
            "threshold": t_all,
            "in_distribution_flagged": int(flagged_in.sum()), "in_distribution": int(len(y)),
            "in_distribution_rate_ci95": wilson(int(flagged_in.sum()), len(y)),
            "ood_images": int(n_ood),
            "ood_flagged_per_fold_model": (ood > t_all).sum(axis=1).tolist(),
            "ood_flagged_by_most_models": by_most,
            "ood_flag_rate_ci95": wilson(by_most, n_ood),
            "non_oct_flagged_per_fold_model": (extra > t_all).sum(axis=1).tolist(),
            "auroc_in_vs_ood": auroc(inside, ood.ravel()),
        }
    return out
