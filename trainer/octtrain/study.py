"""Which model, which out-of-distribution score, which temperature: decided by patient-grouped
cross-validation, every image predicted by a model that never saw its patient.

    python -m octtrain.study --data DATA --ood OOD_DIR --out STUDY_DIR [--configs a,b] [--folds 5]

For each configuration it trains one model per fold and keeps, for every held-out image, its
logits, and for each OOD method its score under that fold's model (each model measured against
its own training images, see octtrain.ood); the shared OOD scans and made-up non-OCT inputs are
scored by every fold's model. `STUDY_DIR/CONFIG.npz` holds the raw numbers, so a
configuration already run is not run again; `STUDY_DIR/summary.json` compares them.
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
from PIL import Image

from .crossval import cross_validate, patient_folds, summarise
from .data import load_dataset, load_images
from .fitting import IDX, seed_everything
from .ood import METHODS
from .preprocess import to_grey01
from .probes import non_oct_inputs

CONFIGS = {
    "compact": dict(arch="compact", epochs=60, lr=1e-3, imagenet=False, singan=False),
    "compact+singan": dict(arch="compact", epochs=60, lr=1e-3, imagenet=False, singan=True),
    "efficientnet_lite0": dict(arch="efficientnet_lite0", epochs=30, lr=3e-4, imagenet=True, singan=False),
    "efficientnet_lite0+singan": dict(arch="efficientnet_lite0", epochs=30, lr=3e-4, imagenet=True, singan=True),
    "xception": dict(arch="xception", epochs=10, lr=1e-3, imagenet=False, singan=False),
}


def training_args(config: dict, seed: int) -> Namespace:
    base = dict(batch=8, seed=seed, device="cpu", select="last", patience=20, pretrained=None,
                trainable="all", singan_scale="small", singan_iterations=30, singan_images=1,
                singan_reject_confidence=0.8)
    merged = {**base, **config}
    merged["use_singan"] = merged.pop("singan")
    return Namespace(**merged)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="octtrain.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ood", help="folder of scans of conditions outside the classes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="compact,efficientnet_lite0")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rate", type=float, default=0.25, help="in-distribution flag rate the threshold is set for")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_dataset(Path(args.data))
    greys = {s.path: to_grey01(Image.open(s.path)) for s in samples}
    folds = patient_folds(samples, args.folds, args.seed)
    y = np.array([IDX[s.label] for s in samples])
    ood_names, ood = load_images(args.ood)
    extra = non_oct_inputs(args.seed)
    summary = {"images": len(samples), "patients": len({s.patient for s in samples}), "folds": args.folds,
               "ood_images": ood_names, "non_oct_inputs": list(extra), "in_distribution_flag_rate": args.rate, "configs": {}}
    for name in args.configs.split(","):
        npz = out / f"{name}.npz"
        if not npz.exists():
            seed_everything(args.seed)
            raw = cross_validate(samples, greys, folds, training_args(CONFIGS[name], args.seed), ood,
                                 list(extra.values()))
            np.savez(npz, **raw)
        raw = dict(np.load(npz))
        summary["configs"][name] = summarise(raw, y, folds, args.rate, args.bootstrap)
        s = summary["configs"][name]
        print(json.dumps({name: {"macro_f1": s["cv"]["macro_f1"], "accuracy": s["cv"]["accuracy"],
                                 "calibration": s["calibration"],
                                 "ood": {m: {k: v for k, v in s["ood"][m].items()
                                             if k in ("in_distribution_flagged", "ood_flagged_per_fold_model",
                                                      "non_oct_flagged_per_fold_model", "auroc_in_vs_ood")}
                                         for m in METHODS}}}, indent=1), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
