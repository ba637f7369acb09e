#!/usr/bin/env bash
# Install what the tests need on a fresh Debian/Ubuntu machine, then run every test:
# the Rust suite (unit + integration against a real Mosquitto) and the trainer's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "==> installing mosquitto (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "==> installing systemd (apt) for systemd-analyze verify/security"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
# The tests start their own brokers; a packaged one must not hold port 1883 for them.
if ! command -v dciodvfy >/dev/null 2>&1; then
    echo "==> installing dicom3tools (apt): dciodvfy validates the de-identified DICOM"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "==> installing postgresql (apt): octd-trainer's fleet-path tests start their own cluster"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# Only what is missing: a Node from NodeSource brings its own npm, which Debian's conflicts with.
browser_pkgs=""
command -v chromium >/dev/null 2>&1 || browser_pkgs="$browser_pkgs chromium"
command -v node >/dev/null 2>&1 || browser_pkgs="$browser_pkgs nodejs"
command -v npm >/dev/null 2>&1 || browser_pkgs="$browser_pkgs npm"
if [ -n "$browser_pkgs" ]; then
    echo "==> installing$browser_pkgs (apt): the reading room's browser tests"
    as_root apt-get update -qq
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $browser_pkgs >/dev/null
fi
if ! cmp -s tests/browser/package-lock.json tests/browser/node_modules/.octd-lock.json; then
    echo "==> npm ci (tests/browser: playwright-core, pinned; it drives Debian's chromium)"
    npm ci --prefix tests/browser --no-audit --no-fund --silent
    cp tests/browser/package-lock.json tests/browser/node_modules/.octd-lock.json
fi
as_root systemctl disable --now mosquitto >/dev/null 2>&1 || true
as_root systemctl disable --now postgresql >/dev/null 2>&1 || true

# cargo-deb compiles while pip downloads (one is CPU-bound, the other mostly network).
deb_install=""
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "==> installing cargo-deb 3.8.0 in the background (builds the .deb in tests/packaging.rs)"
    cargo install -q cargo-deb --locked --version 3.8.0 > /tmp/octd-cargo-deb-install.log 2>&1 &
    deb_install=$!
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, onnxruntime, pytest" >/dev/null 2>&1 \
    || ! cmp -s trainer/requirements.txt .venv/.requirements.txt; then
    echo "==> creating .venv from trainer/requirements.txt"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r trainer/requirements.txt
    cp trainer/requirements.txt .venv/.requirements.txt
fi

if [ -n "$deb_install" ]; then
    if ! wait "$deb_install"; then
        cat /tmp/octd-cargo-deb-install.log >&2
        exit 1
    fi
fi

echo "==> cargo fmt --check"
cargo fmt --check

echo "==> cargo test"
OCTD_REQUIRE_MOSQUITTO=1 OCTD_REQUIRE_BROWSER=1 OCTD_REQUIRE_DCIODVFY=1 OCTD_REQUIRE_POSTGRES=1 OCTD_REQUIRE_S3=1 OCTD_REQUIRE_VENV=1 cargo test --workspace --locked --all-targets

echo "==> pytest (trainer)"
(cd trainer && ../.venv/bin/python -m pytest -q)
