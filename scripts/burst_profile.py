#!/usr/bin/env python3
"""Where a burst's CPU and context switches go, thread by thread.

Starts `octd run` (embedded broker, ONNX Runtime where the .venv has it) on a temporary
state folder, classifies 8 single B-scans to warm it up, then renames N copies of one shared
B-scan into the watch folder at once and waits until each has its artefact and its spooled
original is gone. Prints, for the daemon's threads (by name) and its child processes (the
decoder workers, the broker: both are `octd` processes, so their main threads share a row),
the context switches and the CPU time per scan, read from /proc from just before the first
rename to half a second after the last artefact. Counts are per live thread: a thread that
exits inside that window (an idle blocking thread, a replaced decoder worker) drops out.

    .venv/bin/python scripts/burst_profile.py --octd target/release/octd [--scans 400]

Run it from the repository root (the daemon finds ONNX Runtime in .venv from there).
Linux only; a measurement, not a test.
"""

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BSCAN = os.path.join(REPO, "..", "shared", "data", "oct", "CNV", "CNV-53018-1.jpeg")
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(root):
    """The daemon and every process below it."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for children in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                todo.extend(int(c) for c in open(children).read().split())
            except OSError:
                pass
    return out


def snapshot(root):
    """(process, thread name) -> [voluntary, involuntary switches, CPU ms, threads]."""
    seen = {}
    for pid in processes(root):
        role = "daemon" if pid == root else "child"
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                name = open(f"{task}/comm").read().strip()
                status = dict(
                    line.split(":\t", 1) for line in open(f"{task}/status").read().splitlines() if ":\t" in line
                )
                fields = open(f"{task}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            key = (role, name)
            row = seen.setdefault(key, [0, 0, 0.0, 0])
            row[0] += int(status["voluntary_ctxt_switches"])
            row[1] += int(status["nonvoluntary_ctxt_switches"])
            row[2] += (int(fields[11]) + int(fields[12])) * TICK_MS
            row[3] += 1
    return seen


def wait_for(what, done, timeout=120.0):
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--octd", default=os.path.join(REPO, "target", "release", "octd"))
    parser.add_argument("--scans", type=int, default=400)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="octd-burst-")
    inbox, staging, state = (os.path.join(work, d) for d in ("inbox", "staging", "state"))
    os.makedirs(inbox)
    os.makedirs(staging)
    config = os.path.join(work, "octd.toml")
    with open(config, "w") as f:
        f.write(
            f'[device]\nstate_dir = "{state}"\n[ingest]\nwatch = ["{inbox}"]\n'
            f'[model]\ndir = "{os.path.join(REPO, "models", "default")}"\n'
            f"[pipeline]\nqueue_capacity = {args.scans + 8}\n"
            f'[mqtt]\nembedded_listen = "127.0.0.1:{free_port()}"\n'
        )
    env = dict(os.environ, RUST_LOG="warn")
    daemon = subprocess.Popen(
        [args.octd, "run", "--config", config], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    artefacts = lambda: len(glob.glob(os.path.join(state, "deid", "*.jpg")))
    try:
        time.sleep(3)
        for i in range(8):
            shutil.copy(BSCAN, os.path.join(staging, f"warm{i}.jpeg"))
            os.rename(os.path.join(staging, f"warm{i}.jpeg"), os.path.join(inbox, f"warm{i}.jpeg"))
            wait_for("the warm-up", lambda: artefacts() == i + 1)
        for i in range(args.scans):
            shutil.copy(BSCAN, os.path.join(staging, f"b{i}.jpeg"))
        time.sleep(1)
        before = snapshot(daemon.pid)
        started = time.monotonic()
        for i in range(args.scans):
            os.rename(os.path.join(staging, f"b{i}.jpeg"), os.path.join(inbox, f"b{i}.jpeg"))
        wait_for("the burst", lambda: artefacts() == args.scans + 8 and not os.listdir(os.path.join(state, "spool")))
        elapsed = time.monotonic() - started
        # Results commit and publish after the artefact: let the last ones through.
        time.sleep(0.5)
        after = snapshot(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work, ignore_errors=True)
    n = args.scans
    print(f"burst of {n} B-scans in {elapsed:.2f} s ({n / elapsed:.0f} scans/s to the last artefact)")
    print(f"{'process':8} {'thread':18} {'threads':>7} {'voluntary':>10} {'involuntary':>12} {'CPU ms':>8}  (per scan)")
    totals = [0.0, 0.0, 0.0]
    for key in sorted(after):
        v0, n0, c0, _ = before.get(key, [0, 0, 0.0, 0])
        v1, n1, c1, threads = after[key]
        row = [(v1 - v0) / n, (n1 - n0) / n, (c1 - c0) / n]
        totals = [t + r for t, r in zip(totals, row)]
        if sum(row[:2]) >= 0.1 or row[2] >= 0.05:
            print(f"{key[0]:8} {key[1]:18} {threads:7} {row[0]:10.1f} {row[1]:12.1f} {row[2]:8.2f}")
    print(f"{'all':8} {'':18} {'':7} {totals[0]:10.1f} {totals[1]:12.1f} {totals[2]:8.2f}")


if __name__ == "__main__":
    main()
