"""What a model costs at the edge: MFLOPs per B-scan (PyTorch's FLOP counter, 2 per
multiply-add, at the manifest's input size) and ONNX Runtime latency per B-scan, one thread,
batch 1, on this machine.

    python -m octtrain.cost ARCH [ARCH ...] [--runs 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import CLASSES
from .fitting import input_spec
from .model import ARCHITECTURES, build


def mflops(arch: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    inp = input_spec(arch)
    model = build(arch, len(CLASSES), inp["channels"]).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, inp["channels"], inp["height"], inp["width"]))
    return counter.get_total_flops() / 1e6


def ort_latency_ms(arch: str, runs: int) -> float:
    import onnxruntime as ort

    from .train import export_onnx

    inp = input_spec(arch)
    model = build(arch, len(CLASSES), inp["channels"]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, path, inp=inp)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, inp["channels"], inp["height"], inp["width"]), dtype=np.float32)
        for _ in range(10):
            sess.run(None, {"input": x})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, {"input": x})
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="octtrain.cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", nargs="+", choices=list(ARCHITECTURES))
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    for arch in args.arch:
        print(json.dumps({"arch": arch, "mflops": round(mflops(arch), 1),
                          "onnxruntime_1_thread_ms_p50": round(ort_latency_ms(arch, args.runs), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
