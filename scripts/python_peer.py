#!/usr/bin/env python3
"""The plain-Python peer octd is measured against (docs/benchmarks.md, the speed issue).

It does octd's job the way a serial script would: watch a folder (inotify), de-identify
(pydicom for DICOM: identifying attributes and private tags removed; Pillow for images: the
pixels kept as a PNG), classify with onnxruntime on the shipped model with the edge's own
preprocessing (octtrain.preprocess), commit the result to SQLite (one transaction per scan,
WAL, synchronous=FULL), publish it over MQTT at QoS 1 and wait for the PUBACK, then remove
the input. The de-identified file is fsynced before the commit, as octd's is.

What it leaves out, and octd does not: the isolated decoder, input limits, quarantine with a
reason, crash recovery and the poison-scan rule, the sealed linkage, the PS3.15 profile in
full, burned-in masks, triage, heatmaps, the out-of-distribution flag beyond the model's own
output, the outbox that survives a broker outage. It is a yardstick, not a replacement.

    .venv/bin/python scripts/python_peer.py --watch DIR --state DIR --broker 127.0.0.1:PORT \
        [--model models/default] [--threads 0]

Prints "ready" on stdout once it is connected and watching.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import pathlib
import sqlite3
import struct
import sys
import time
import uuid

# Before onnxruntime is imported, which starts its telemetry (octd and octtrain do the same).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer"))
from octtrain.preprocess import preprocess  # noqa: E402  (the edge's own definition)

IN_CLOSE_WRITE = 0x08
IN_MOVED_TO = 0x80
IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientAddress",
    "OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "DeviceSerialNumber",
)


class Inotify:
    """The folder's IN_CLOSE_WRITE / IN_MOVED_TO events, blocking (the stdlib has no inotify)."""

    def __init__(self, folder: pathlib.Path):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(0)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(folder).encode(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def wait(self) -> None:
        data = os.read(self.fd, 64 * 1024)
        assert len(data) >= struct.calcsize("iIII")


def deidentify(path: pathlib.Path, out_dir: pathlib.Path, scan_id: str) -> tuple[list[Image.Image], str]:
    """The de-identified file written and fsynced; the frames to classify."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        ds = pydicom.dcmread(path)
        for keyword in IDENTIFYING:
            if keyword in ds:
                delattr(ds, keyword)
        ds.remove_private_tags()
        pixels = ds.pixel_array
        several = int(getattr(ds, "NumberOfFrames", 1) or 1) > 1
        frames = [Image.fromarray(f) for f in (pixels if several else pixels[None])]
        out = out_dir / f"{scan_id}.dcm"
        ds.save_as(out)
    else:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA", "CMYK"):
                img = img.convert("RGB")
            clean = Image.frombytes(img.mode, img.size, img.tobytes())  # pixels only
        frames = [clean]
        out = out_dir / f"{scan_id}.png"
        clean.save(out, compress_level=1)  # fast deflate, as octd's PNG artefacts (it keeps a JPEG as JPEG)
    with open(out, "rb+") as f:
        os.fsync(f.fileno())
    return frames, out.name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watch", type=pathlib.Path, required=True)
    parser.add_argument("--state", type=pathlib.Path, required=True)
    parser.add_argument("--broker", required=True, help="host:port")
    parser.add_argument("--model", type=pathlib.Path, default=ROOT / "models/default")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads; 0: its default")
    args = parser.parse_args()

    manifest = json.loads((args.model / "manifest.json").read_text())
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model / manifest["model_file"]), options,
                                   providers=["CPUExecutionProvider"])
    input_name = manifest["input"]["name"]
    labels = manifest["classes"]

    deid_dir = args.state / "deid"
    deid_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(args.state / "peer.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS results (scan_id TEXT PRIMARY KEY, artefact TEXT, label TEXT,"
               " probabilities TEXT, classified_at REAL)")

    host, port = args.broker.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="python-peer")
    client.connect(host, int(port))
    client.loop_start()

    watch = Inotify(args.watch)
    print("ready", flush=True)
    while True:
        pending = sorted(
            (e for e in os.scandir(args.watch) if e.is_file() and not e.name.startswith(".")),
            key=lambda e: e.stat().st_mtime_ns,
        )
        if not pending:
            watch.wait()
            continue
        for entry in pending:
            started = time.perf_counter()
            scan_id = str(uuid.uuid4())
            path = pathlib.Path(entry.path)
            frames, artefact = deidentify(path, deid_dir, scan_id)
            batch = np.stack([preprocess(f, manifest["input"]) for f in frames])
            logits = session.run(None, {input_name: batch})[0]
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = (probs / probs.sum(axis=1, keepdims=True)).mean(axis=0)
            result = {
                "scan_id": scan_id,
                "label": labels[int(np.argmax(probs))],
                "probabilities": {label: float(p) for label, p in zip(labels, probs)},
                "frames": len(frames),
            }
            db.execute("BEGIN")
            db.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?)",
                       (scan_id, artefact, result["label"], json.dumps(result["probabilities"]), time.time()))
            db.execute("COMMIT")
            result["total_ms"] = (time.perf_counter() - started) * 1000
            client.publish(f"oct/peer/python/results/{scan_id}", json.dumps(result), qos=1).wait_for_publish()
            path.unlink()


if __name__ == "__main__":
    main()
