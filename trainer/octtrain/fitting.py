"""Training one classifier: the edge's input tensor, augmentation, the training loop, and
SinGAN synthesis for the scarce classes."""

from __future__ import annotations

import random
import time
from collections import Counter

import numpy as np
import torch
from torch import nn

from .data import CLASSES, Sample
from .evaluate import softmax
from .model import WithActivationMaps, build
from .preprocess import resize_bilinear
from .singan import SinGAN, SinGANConfig

INPUT = {"name": "input", "layout": "NCHW", "channels": 1, "height": 224, "width": 224,
         "colour": "grey", "resize": "bilinear_half_pixel", "value_range": [0.0, 1.0],
         "mean": [0.2], "std": [0.2]}
# ImageNet's mean and std seen through a grey image (R = G = B) for backbones trained on it.
IMAGENET_INPUT = {**INPUT, "mean": [0.449], "std": [0.226]}
IDX = {c: i for i, c in enumerate(CLASSES)}


def input_spec(arch: str) -> dict:
    return IMAGENET_INPUT if arch == "efficientnet_lite0" else INPUT


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


def predict(model: nn.Module, images: list[np.ndarray], device: str = "cpu", inp: dict = INPUT) -> np.ndarray:
    return softmax(embed(model, images, device, inp)[0])


def embed(model: nn.Module, images: list[np.ndarray], device: str = "cpu", inp: dict = INPUT,
          batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the pooled penultimate features the classifier reads, in batches."""
    if not images:
        return np.zeros((0, len(CLASSES)), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    model.eval()
    features, linear = WithActivationMaps(model).parts()
    logits, pooled = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.stack([tensor_from_grey(g, inp) for g in images[start:start + batch]])).to(device)
            f = features(x).mean(dim=(2, 3))
            pooled.append(f.cpu().numpy())
            logits.append(linear(f).cpu().numpy())
    return np.concatenate(logits), np.concatenate(pooled)


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
    inp = input_spec(args.arch)
    model = build(args.arch, len(CLASSES), inp["channels"], imagenet=getattr(args, "imagenet", False))
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
            x = torch.from_numpy(np.stack([tensor_from_grey(augment(g, rng), inp) for g, _ in batch])).to(args.device)
            y = torch.tensor([label for _, label in batch], device=args.device)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        if val:
            p = predict(model, [g for g, _ in val], args.device, inp)
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
            probs = predict(reference, samples, args.device, input_spec(args.arch))
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
