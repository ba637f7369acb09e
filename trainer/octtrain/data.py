"""Labelled OCT images from the Kermany layout, a flat class-folder layout or a CSV manifest."""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
IMAGE_EXT = {".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp"}
_KERMANY = re.compile(r"^(CNV|DME|DRUSEN|NORMAL)-([^-]+)-\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    patient: str
    synthetic: bool = False


def patient_of(path: Path) -> str:
    """Kermany names are CLASS-PATIENT-N; any other name is its own patient."""
    m = _KERMANY.match(path.stem)
    return m.group(2) if m else path.stem


def _class_folders(root: Path) -> list[Sample]:
    out = []
    for label in CLASSES:
        folder = root / label
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in IMAGE_EXT:
                    out.append(Sample(p, label, patient_of(p)))
    return out


def load_dataset(source: Path) -> list[Sample]:
    """A CSV (path,label[,patient]), OCT2017/{train,test,val}/CLASS/ or a flat CLASS/ layout."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        out = []
        with source.open(newline="") as fh:
            for row in csv.DictReader(fh):
                label = row["label"].strip().upper()
                if label not in CLASSES:
                    raise ValueError(f"unknown label {label!r} in {source}")
                path = (source.parent / row["path"]).resolve()
                patient = (row.get("patient") or "").strip() or patient_of(path)
                out.append(Sample(path, label, patient))
        return out
    splits = [source / s for s in ("train", "val", "test") if (source / s).is_dir()]
    if splits:
        return [s for split in splits for s in _class_folders(split)]
    samples = _class_folders(source)
    if not samples:
        raise ValueError(f"no labelled images found under {source}")
    return samples


def patient_split(samples: list[Sample], fractions=(0.6, 0.2, 0.2), seed: int = 0):
    """Split by patient so that no patient straddles two parts; per class, so each part
    keeps every class where there are enough patients."""
    rng = random.Random(seed)
    parts: tuple[list, list, list] = ([], [], [])
    by_class: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        by_class.setdefault(s.label, {}).setdefault(s.patient, []).append(s)
    assigned: dict[str, int] = {}
    for label in sorted(by_class):
        patients = sorted(p for p in by_class[label] if p not in assigned)
        rng.shuffle(patients)
        n = len(patients)
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        for i, p in enumerate(patients):
            assigned[p] = 2 if i < n_test else 1 if i < n_test + n_val else 0
    for s in samples:
        parts[assigned[s.patient]].append(s)
    return parts


def load_images(folder) -> tuple[list[str], list]:
    """Every image file in a folder (not recursive), sorted by name: names and grey pixels."""
    from PIL import Image

    from .preprocess import to_grey01

    if not folder or not Path(folder).is_dir():
        return [], []
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXT)
    return [p.name for p in paths], [to_grey01(Image.open(p)) for p in paths]
