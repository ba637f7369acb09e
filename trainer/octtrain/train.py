"""Train, evaluate honestly on a patient-grouped split, export ONNX and the edge manifest.

    python -m octtrain --data DATA --out MODEL_DIR [--singan auto|on|off] [--cv 4] ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .data import CLASSES, Sample, load_dataset, patient_split
from .evaluate import plots, with_bootstrap, write_report
from .model import WithActivationMaps, build
from .preprocess import resize_bilinear, to_grey01
from .singan import SinGAN, SinGANConfig

INPUT = {"name": "input", "layout": "NCHW", "channels": 1, "height": 224, "width": 224,
         "colour": "grey", "resize": "bilinear_half_pixel", "value_range": [0.0, 1.0],
         "mean": [0.2], "std": [0.2]}
IDX = {c: i for i, c in enumerate(CLASSES)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """OCT-appropriate: flips, small shifts/crops, gamma/contrast, speckle-like noise."""
    h, w = grey.shape
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    ch, cw = int(h * rng.uniform(0.85, 1.0)), int(w * rng.uniform(0.85, 1.0))
    y = rng.integers(0, h - ch + 1)
    x = rng.integers(0, w - cw + 1)
    grey = np.ascontiguousarray(grey[y:y + ch, x:x + cw])
    grey = np.clip(grey, 0, 1) ** rng.uniform(0.8, 1.25)
    grey = grey * rng.uniform(0.85, 1.15)
    speckle = rng.gamma(shape=20.0, scale=1 / 20.0, size=grey.shape).astype(np.float32)
    return np.clip(grey * speckle, 0, 1).astype(np.float32)


def tensor_from_grey(grey: np.ndarray, inp: dict = INPUT) -> np.ndarray:
    """The edge's preprocessing (see preprocess.py), on an already decoded grey image."""
    r = resize_bilinear(grey.astype(np.float32), inp["height"], inp["width"])
    return ((r - np.float32(inp["mean"][0])) / np.float32(inp["std"][0]))[None].astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(model: nn.Module, images: list[np.ndarray], device: str = "cpu") -> np.ndarray:
    if not images:
        return np.zeros((0, len(CLASSES)), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([tensor_from_grey(g) for g in images])).to(device)
        return softmax(model(x).cpu().numpy())


def _small(grey: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Training-time copy at most 512 px wide: augmentation crops and resizes it anyway."""
    h, w = grey.shape
    s = max_side / max(h, w)
    return grey if s >= 1 else resize_bilinear(grey, max(1, round(h * s)), max(1, round(w * s)))


def set_trainable(model: nn.Module, arch: str, trainable: str) -> None:
    """all, or only the last blocks of Xception (as the original experiments did)."""
    if arch != "xception" or trainable == "all":
        return
    keep = {"block14": ("conv3", "bn3", "conv4", "bn4", "fc"),
            "blocks13-14": ("block12", "conv3", "bn3", "conv4", "bn4", "fc")}[trainable]
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(keep)


def fit(items: list[tuple[np.ndarray, int]], val: list[tuple[np.ndarray, int]], args, log=print) -> nn.Module:
    """Class-weighted training. With a validation set large enough to choose by (or
    `--select val`), keep the epoch with the best validation log-loss and stop early;
    otherwise train all epochs and keep the last: on a handful of validation images the
    best log-loss is an early, near-uniform model."""
    select_on_val = bool(val) and (args.select == "val" or (args.select == "auto" and len(val) >= 50))
    seed_everything(args.seed)
    model = build(args.arch, len(CLASSES), INPUT["channels"])
    if args.pretrained:
        state = torch.load(args.pretrained, map_location="cpu")
        missing, _ = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        log(f"loaded {args.pretrained}; newly initialised: {missing}")
    set_trainable(model, args.arch, args.trainable)
    model.to(args.device)
    counts = Counter(label for _, label in items)
    weights = torch.tensor([len(items) / (len(CLASSES) * max(counts[i], 1)) for i in range(len(CLASSES))],
                           dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(args.device), label_smoothing=0.05)
    rng = np.random.default_rng(args.seed)
    small = [(_small(g), y) for g, y in items]
    best, best_state, patience = float("inf"), None, 0
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(small))
        for start in range(0, len(order), args.batch):
            batch = [small[i] for i in order[start:start + args.batch]]
            x = torch.from_numpy(np.stack([tensor_from_grey(augment(g, rng)) for g, _ in batch])).to(args.device)
            y = torch.tensor([label for _, label in batch], device=args.device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        if val:
            p = predict(model, [g for g, _ in val], args.device)
            yv = np.array([label for _, label in val])
            nll = float(-np.mean(np.log(p[np.arange(len(yv)), yv] + 1e-9)))
            acc = float(np.mean(p.argmax(1) == yv))
        else:
            nll, acc = float(loss.item()), float("nan")
        if epoch % 5 == 0 or epoch == args.epochs - 1:
            log(f"  epoch {epoch:3d} train_loss {loss.item():.3f} val_nll {nll:.3f} val_acc {acc:.3f}")
        if not select_on_val:
            continue
        if nll < best:
            best, best_state, patience = nll, {k: v.detach().clone() for k, v in model.state_dict().items()}, 0
        else:
            patience += 1
            if patience >= args.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu().eval()


def singan_config(args) -> SinGANConfig:
    cfg = SinGANConfig.full() if args.singan_scale == "full" else SinGANConfig.small()
    if args.singan_iterations:
        cfg.iterations = args.singan_iterations
    return cfg


def synthesize(train: list[Sample], greys: dict, reference: nn.Module, args, log=print):
    """SinGAN samples for the scarce classes of the training split only, filtered by a
    reference classifier trained on real images. Returns (items, summary)."""
    counts = Counter(s.label for s in train)
    top = max(counts.values())
    cfg = singan_config(args)
    rng = random.Random(args.seed)
    items, summary = [], {"config": cfg.__dict__, "per_class": {}}
    for label in CLASSES:
        deficit = top - counts[label]
        sources = [s for s in train if s.label == label]
        if deficit <= 0 or not sources:
            continue
        sources = rng.sample(sources, min(args.singan_images, len(sources)))
        per_source = max(1, int(np.ceil(deficit / len(sources))))
        made, kept = 0, []
        for i, s in enumerate(sources):
            t0 = time.time()
            gan = SinGAN(cfg, device=args.device, seed=args.seed + i).fit(greys[s.path])
            samples = gan.sample(per_source, seed=args.seed + 100 + i)
            made += len(samples)
            probs = predict(reference, samples)
            for img, p in zip(samples, probs):
                other = int(p.argmax()) != IDX[label]
                if other and p.max() >= args.singan_reject_confidence:
                    continue  # the reference classifier is sure it is another class
                kept.append((img, IDX[label]))
            log(f"  SinGAN {label} source {i}: {len(samples)} samples in {time.time() - t0:.0f}s, "
                f"reconstruction RMSE {gan.reconstruction_error():.3f}")
        items.extend(kept[:deficit])
        summary["per_class"][label] = {"sources": len(sources), "generated": made, "kept": len(kept[:deficit])}
    summary["synthetic_total"] = len(items)
    return items, summary


def cross_validate(samples: list[Sample], greys: dict, args, log=print) -> dict:
    """Patient-grouped K-fold: every image is predicted once by a model that never saw its
    patient. Real images only (SinGAN per fold would multiply the cost)."""
    patients = sorted({s.patient for s in samples})
    random.Random(args.seed).shuffle(patients)
    fold_of = {p: i % args.cv for i, p in enumerate(patients)}
    probs = np.zeros((len(samples), len(CLASSES)), dtype=np.float32)
    for k in range(args.cv):
        train = [(greys[s.path], IDX[s.label]) for s in samples if fold_of[s.patient] != k]
        held = [i for i, s in enumerate(samples) if fold_of[s.patient] == k]
        log(f"cv fold {k + 1}/{args.cv}: {len(train)} train, {len(held)} held out")
        model = fit(train, [], args, log)
        probs[held] = predict(model, [greys[samples[i].path] for i in held])
    y = np.array([IDX[s.label] for s in samples])
    return {"folds": args.cv, "pooled": with_bootstrap(probs, y, CLASSES, rounds=args.bootstrap)}


def train(args: argparse.Namespace, log=print) -> dict:
    seed_everything(args.seed)
    samples = load_dataset(Path(args.data))
    train_s, val_s, test_s = patient_split(samples, seed=args.seed)
    greys = {s.path: to_grey01(Image.open(s.path)) for s in samples}
    real = lambda part: [(greys[s.path], IDX[s.label]) for s in part]  # noqa: E731
    use_singan = args.singan == "on" or (args.singan == "auto" and len(samples) < args.singan_threshold)
    log(f"{len(samples)} images; split train/val/test {len(train_s)}/{len(val_s)}/{len(test_s)} "
        f"(patient-grouped); SinGAN {'on' if use_singan else 'off'}")

    log("training on real images")
    baseline = fit(real(train_s), real(val_s), args, log)
    model, synth_summary, synthetic = baseline, {"synthetic_total": 0}, []
    if use_singan:
        synthetic, synth_summary = synthesize(train_s, greys, baseline, args, log)
        log(f"training on real + {len(synthetic)} synthetic images")
        model = fit(real(train_s) + synthetic, real(val_s), args, log)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    y_test = np.array([IDX[s.label] for s in test_s])
    p_test = predict(model, [greys[s.path] for s in test_s])
    report = {"split": {"train": len(train_s), "val": len(val_s), "test": len(test_s),
                        "grouped_by": "patient"},
              "test": with_bootstrap(p_test, y_test, CLASSES, rounds=args.bootstrap)}
    figures = plots(p_test, y_test, CLASSES, out, "test") if len(test_s) else []
    if use_singan:
        p_base = predict(baseline, [greys[s.path] for s in test_s])
        report["comparison"] = {"without_singan": with_bootstrap(p_base, y_test, CLASSES, rounds=args.bootstrap),
                                "with_singan": report["test"], "synthetic": synth_summary}
    if args.cv:
        report["cross_validation"] = cross_validate(samples, greys, args, log)

    val_p = predict(model, [greys[s.path] for s in val_s])
    val_y = np.array([IDX[s.label] for s in val_s])
    correct = val_p.max(1)[val_p.argmax(1) == val_y] if len(val_y) else np.array([])
    # Threshold from validation: the 10th percentile of confidence on correct answers.
    # Never below 0.5: a model less than even odds on its own label is not to be trusted alone.
    min_conf = float(np.clip(np.quantile(correct, 0.1) if len(correct) else 0.5, 0.5, 0.9))
    stats = np.array([[greys[s.path].mean(), greys[s.path].std()] for s in train_s])
    review = {
        "min_confidence": round(min_conf, 4),
        "input_mean_range": [round(float(stats[:, 0].min()) * 0.7, 4), round(float(stats[:, 0].max()) * 1.3, 4)],
        "input_std_range": [round(float(stats[:, 1].min()) * 0.7, 4), round(float(stats[:, 1].max()) * 1.3, 4)],
    }
    if args.ood and Path(args.ood).is_dir():
        ood = [to_grey01(Image.open(p)) for p in sorted(Path(args.ood).iterdir()) if p.suffix.lower() in
               {".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp"}]
        pp = predict(model, ood)
        unlike = [not (review["input_mean_range"][0] <= g.mean() <= review["input_mean_range"][1]
                       and review["input_std_range"][0] <= g.std() <= review["input_std_range"][1]) for g in ood]
        flagged = [bool(p.max() < min_conf or u) for p, u in zip(pp, unlike)]
        in_dist = predict(model, [greys[s.path] for s in test_s])
        report["ood"] = {"images": len(ood), "flagged_for_review": int(sum(flagged)),
                         "test_images_flagged": int(np.sum(in_dist.max(1) < min_conf)),
                         "threshold": min_conf}

    export_onnx(model, out / "model.onnx")
    digest = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    parity = onnx_parity(model, out / "model.onnx", [greys[s.path] for s in test_s + val_s][:16])
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
        "input": INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "heatmap": HEATMAP,
        "classes": CLASSES,
        "review": review,
        "training": {
            "data": data_name,
            "counts": {part: dict(Counter(s.label for s in ss))
                       for part, ss in (("train", train_s), ("val", val_s), ("test", test_s))},
            "real_train_images": len(train_s),
            "synthetic": synth_summary.get("synthetic_total", 0),
            "singan": use_singan,
            "seed": args.seed,
            "command": " ".join(["python", "-m", "octtrain"] + [str(a) for a in (args.argv or [])]),
        },
        "metrics": {"test_accuracy": report["test"]["accuracy"]["value"],
                    "test_macro_f1": report["test"]["macro_f1"]["value"],
                    "test_images": len(test_s), "report": "evaluation.json"},
        "export_parity_max_abs_diff": parity,
        "intended_use": "demonstration only; not for clinical use",
    }
    report["figures"] = figures
    report["export_parity_max_abs_diff"] = parity
    write_report(report, out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(json.dumps({"test": {k: report["test"][k] for k in ("accuracy", "macro_f1")}}, indent=1))
    return manifest


HEATMAP = {"output": "cam", "kind": "class_activation"}


def export_onnx(model: nn.Module, path: Path) -> None:
    """Two outputs: `logits`, and `cam`, the class activation maps (docs/model-manifest.md)."""
    model.eval()
    wrapped = WithActivationMaps(model).eval()
    dummy = torch.zeros(1, INPUT["channels"], INPUT["height"], INPUT["width"])
    torch.onnx.export(wrapped, dummy, str(path), input_names=["input"], output_names=["logits", "cam"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "cam": {0: "batch"}},
                      opset_version=17, dynamo=False)


def onnx_parity(model: nn.Module, path: Path, greys: list[np.ndarray]) -> float:
    """Max |PyTorch - onnxruntime| over sample inputs, both outputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.stack([tensor_from_grey(g) for g in greys]).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in WithActivationMaps(model).eval()(torch.from_numpy(x))]
    got = sess.run(None, {"input": x})
    return float(max(np.abs(r - g).max() for r, g in zip(ref, got)))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="octtrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (Kermany or class folders) or CSV manifest")
    ap.add_argument("--out", required=True, help="output model folder")
    ap.add_argument("--arch", default="compact", choices=["compact", "xception"])
    ap.add_argument("--pretrained", help="local ImageNet weights for xception (nothing is downloaded)")
    ap.add_argument("--trainable", default="all", choices=["all", "block14", "blocks13-14"])
    ap.add_argument("--name", default="octd-compact")
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
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
    args = ap.parse_args(argv)
    args.argv = argv
    train(args)
    return 0
