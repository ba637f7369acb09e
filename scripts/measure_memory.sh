#!/usr/bin/env bash
# Peak memory of the daemon and of its decoder worker for one volume (docs/benchmarks.md).
# Usage: scripts/measure_memory.sh [FRAMES] [BINARY]   (defaults: 128, target/release/octd)
set -euo pipefail
cd "$(dirname "$0")/.."
frames="${1:-128}"
octd="${2:-target/release/octd}"
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cargo run -q --example make_volume -- "$frames" "$work/volume.dcm"
port=$((20000 + RANDOM % 20000))
cat > "$work/octd.toml" <<TOML
[device]
state_dir = "$work/state"
[ingest]
watch = ["$work/inbox"]
settle = "200ms"
[model]
dir = "$PWD/models/default"
backend = "tract"
threads = 1
[pipeline]
workers = 1
[mqtt]
embedded_listen = "127.0.0.1:$port"
[telemetry]
listen = ""
TOML
mkdir -p "$work/inbox"
"$octd" run --config "$work/octd.toml" > "$work/log" 2>&1 &
pid=$!
until grep -q watching "$work/log"; do sleep 0.1; done
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Warm: one single B-scan first, so the model's own buffers are in the baseline.
scan="$(find ../shared/data/oct -name '*.jpeg' | sort | head -1)"
cp "$scan" "$work/inbox/.s.partial" && mv "$work/inbox/.s.partial" "$work/inbox/scan.jpeg"
until grep -q "classified" "$work/log"; do sleep 0.05; done
warm=$(hwm "$pid")
worker_warm=0
for child in $(pgrep -P "$pid" || true); do
    w=$(hwm "$child"); [ "$w" -gt "$worker_warm" ] && worker_warm=$w
done
cp "$work/volume.dcm" "$work/inbox/.v.partial" && mv "$work/inbox/.v.partial" "$work/inbox/volume.dcm"
worker_peak=0
until [ "$(grep -c "classified" "$work/log")" -ge 2 ]; do
    for child in $(pgrep -P "$pid" || true); do
        w=$(hwm "$child"); [ "$w" -gt "$worker_peak" ] && worker_peak=$w
    done
    sleep 0.05
done
daemon_peak=$(hwm "$pid")
decoded=$((frames * 512 * 496 / 1024))
echo "frames=$frames decoded_kib=$decoded file_kib=$(( $(stat -c %s "$work/volume.dcm") / 1024 ))"
echo "daemon_warm_hwm_kib=$warm daemon_peak_hwm_kib=$daemon_peak worker_warm_hwm_kib=$worker_warm worker_peak_hwm_kib=$worker_peak"
