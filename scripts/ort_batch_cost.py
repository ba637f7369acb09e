#!/usr/bin/env python3
"""What a batch costs ONNX Runtime on the CPU with the shipped model, per B-scan and in memory
(docs/benchmarks.md, the speed issue): the evidence for `model.batch_size = 0` meaning one
B-scan per call on the CPU.

    .venv/bin/python scripts/ort_batch_cost.py            # ms per B-scan, batch 1..16, 1 and 2 threads
    .venv/bin/python scripts/ort_batch_cost.py --memory   # RSS after batch 1 and batch 8, one session

Run it on a quiet machine: the other core's load shows in the figures.
"""
import argparse
import os
import pathlib
import time

# Before onnxruntime is imported, which starts its telemetry (octd and octtrain do the same).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

MODEL = pathlib.Path(__file__).resolve().parent.parent / "models/default/model.onnx"


def rss_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def session(threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads > 1 else "1")
    return ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    name = "input"
    if args.memory:
        base = rss_mib()
        s = session(1)
        loaded = rss_mib()
        for batch in (1, 8):
            x = np.random.rand(batch, 1, 224, 224).astype(np.float32)
            for _ in range(3):
                s.run(None, {name: x})
            print(f"one session, 1 thread: loaded +{loaded - base} MiB; after batch {batch}: +{rss_mib() - base} MiB")
        return
    for threads in (1, 2):
        s = session(threads)
        for batch in (1, 2, 4, 8, 16):
            x = np.random.rand(batch, 1, 224, 224).astype(np.float32)
            for _ in range(3):
                s.run(None, {name: x})
            runs = max(64 // batch, 4)
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, {name: x})
            per_scan = (time.perf_counter() - t0) / runs / batch * 1000
            print(f"{threads} thread(s), batch {batch}: {per_scan:.2f} ms per B-scan")


if __name__ == "__main__":
    main()
