"""Train, evaluate on a patient-grouped held-out split, export ONNX and the manifest."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .data import CLASSES, load_dataset, patient_split
from .model import build
from .preprocess import preprocess, resize_bilinear, to_grey01

INPUT = {"name": "input", "layout": "NCHW", "channels": 1, "height": 224, "width": 224,
         "colour": "grey", "resize": "bilinear_half_pixel", "value_range": [0.0, 1.0],
         "mean": [0.2], "std": [0.2]}


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
    crop = rng.uniform(0.85, 1.0)
    ch, cw = int(h * crop), int(w * rng.uniform(0.85, 1.0))
    y = rng.integers(0, h - ch + 1)
    x = rng.integers(0, w - cw + 1)
    grey = np.ascontiguousarray(grey[y:y + ch, x:x + cw])
    grey = np.clip(grey, 0, 1) ** rng.uniform(0.8, 1.25)
    grey = grey * rng.uniform(0.85, 1.15)
    speckle = rng.gamma(shape=20.0, scale=1 / 20.0, size=grey.shape).astype(np.float32)
    return np.clip(grey * speckle, 0, 1).astype(np.float32)


def tensor_from_grey(grey: np.ndarray, inp: dict) -> np.ndarray:
    r = resize_bilinear(grey.astype(np.float32), inp["height"], inp["width"])
    return ((r - np.float32(inp["mean"][0])) / np.float32(inp["std"][0]))[None].astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(model: nn.Module, images: list[np.ndarray], inp: dict) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([tensor_from_grey(g, inp) for g in images]))
        return softmax(model(x).numpy())


def train(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    samples = load_dataset(Path(args.data))
    train_s, val_s, test_s = patient_split(samples, seed=args.seed)
    greys = {s.path: to_grey01(Image.open(s.path)) for s in samples}
    idx = {c: i for i, c in enumerate(CLASSES)}
    counts = Counter(s.label for s in train_s)
    weights = torch.tensor([len(train_s) / (len(CLASSES) * max(counts[c], 1)) for c in CLASSES])
    model = build(args.arch, len(CLASSES), INPUT["channels"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.05)
    rng = np.random.default_rng(args.seed)
    best = (-1.0, None)
    patience = 0
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train_s))
        for start in range(0, len(order), args.batch):
            batch = [train_s[i] for i in order[start:start + args.batch]]
            x = torch.from_numpy(np.stack([tensor_from_grey(augment(greys[s.path], rng), INPUT)
                                           for s in batch]))
            y = torch.tensor([idx[s.label] for s in batch])
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        probs = predict(model, [greys[s.path] for s in val_s], INPUT)
        val_acc = float(np.mean(probs.argmax(1) == np.array([idx[s.label] for s in val_s])))
        val_nll = float(-np.mean(np.log(probs[np.arange(len(val_s)),
                                              [idx[s.label] for s in val_s]] + 1e-9)))
        score = val_acc - 0.01 * val_nll
        print(f"epoch {epoch:3d} loss {loss.item():.3f} val_acc {val_acc:.3f} val_nll {val_nll:.3f}",
              flush=True)
        if score > best[0]:
            best = (score, {k: v.clone() for k, v in model.state_dict().items()})
            patience = 0
        else:
            patience += 1
            if patience >= args.patience:
                break
    model.load_state_dict(best[1])

    def evaluate(part):
        p = predict(model, [greys[s.path] for s in part], INPUT)
        y = np.array([idx[s.label] for s in part])
        return p, y

    val_p, val_y = evaluate(val_s)
    test_p, test_y = evaluate(test_s)
    conf_correct = val_p.max(1)[val_p.argmax(1) == val_y]
    min_conf = float(np.clip(np.quantile(conf_correct, 0.1) if len(conf_correct) else 0.5, 0.4, 0.9))
    stats = np.array([[g.mean(), g.std()] for g in (greys[s.path] for s in train_s)])
    metrics = {
        "split": "patient-grouped held-out test",
        "test_images": int(len(test_y)),
        "test_accuracy": float(np.mean(test_p.argmax(1) == test_y)) if len(test_y) else None,
        "val_images": int(len(val_y)),
        "val_accuracy": float(np.mean(val_p.argmax(1) == val_y)) if len(val_y) else None,
        "confusion_matrix_test": [[int(np.sum((test_y == i) & (test_p.argmax(1) == j)))
                                   for j in range(len(CLASSES))] for i in range(len(CLASSES))],
    }
    manifest = {
        "format_version": 1,
        "name": args.name,
        "version": args.version,
        "architecture": args.arch,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "trainer": f"octtrain {__version__}",
        "model_file": "model.onnx",
        "sha256": "",
        "input": INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "classes": CLASSES,
        "review": {
            "min_confidence": round(min_conf, 4),
            "input_mean_range": [round(float(stats[:, 0].min()) * 0.7, 4),
                                 round(float(stats[:, 0].max()) * 1.3, 4)],
            "input_std_range": [round(float(stats[:, 1].min()) * 0.7, 4),
                                round(float(stats[:, 1].max()) * 1.3, 4)],
        },
        "training": {
            "data": "../shared/data/oct (41 Kermany 2018 B-scans)" if "shared" in str(args.data) else str(args.data),
            "counts": {part: dict(Counter(s.label for s in ss))
                       for part, ss in (("train", train_s), ("val", val_s), ("test", test_s))},
            "synthetic": 0,
            "seed": args.seed,
            "epochs_max": args.epochs,
            "command": " ".join(["python", "-m", "octtrain"] + sys.argv[1:]),
        },
        "metrics": metrics,
        "intended_use": "demonstration only; not for clinical use",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out / "model.onnx")
    manifest["sha256"] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    manifest["export_parity_max_abs_diff"] = onnx_parity(model, out / "model.onnx",
                                                         [greys[s.path] for s in test_s + val_s])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return manifest


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, INPUT["channels"], INPUT["height"], INPUT["width"])
    torch.onnx.export(model, dummy, str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)


def onnx_parity(model: nn.Module, path: Path, greys: list[np.ndarray]) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.stack([tensor_from_grey(g, INPUT) for g in greys]).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = sess.run(None, {"input": x})[0]
    return float(np.abs(ref - got).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="octtrain", description=__doc__)
    ap.add_argument("--data", required=True, help="dataset folder or CSV manifest")
    ap.add_argument("--out", required=True, help="output model folder")
    ap.add_argument("--arch", default="compact", choices=["compact", "xception"])
    ap.add_argument("--name", default="octd-compact")
    ap.add_argument("--version", default="0.1.0")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    train(args)
    return 0
