#!/usr/bin/env python3
"""onnxruntime called directly from Python on the exact tensors `cargo bench --bench
backends` wrote to target/bench-inputs/: the baseline octd's ONNX Runtime backend is
compared with in docs/benchmarks.md.

    .venv/bin/python scripts/bench_onnxruntime.py [--threads 2] [--runs 200]
"""
import argparse
import os
import pathlib
import statistics
import time

# Before onnxruntime is imported, which starts its telemetry (octd and octtrain do the same).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(ROOT / "models/default/model.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {args.runs} runs")
    for batch in (1, 8):
        raw = (ROOT / f"target/bench-inputs/batch{batch}.f32").read_bytes()
        tensor = np.frombuffer(raw, dtype="<f4").reshape(batch, 1, 224, 224)
        for _ in range(20):
            session.run(None, {name: tensor})
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            session.run(None, {name: tensor})
            times.append(time.perf_counter() - start)
        times.sort()
        p95 = times[int(len(times) * 0.95) - 1]
        print(f"batch{batch}: median {statistics.median(times) * 1e3:.3f} ms, p95 {p95 * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
