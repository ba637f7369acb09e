#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 600), seeded from the test fixtures.
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked); not in CI.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(deidentify dicom_walk bundle_archive worker_protocol)
cargo run -q --example fuzz_seeds
cargo +nightly fuzz build
for t in "${targets[@]}"; do
    echo "==> $t for ${seconds}s"
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
        2>&1 | tee "fuzz/$t.log" | grep -E "^#|Done|stat::|ERROR|SUMMARY" || true
done
