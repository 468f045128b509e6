#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, the integration tests
# that boot the probe guest and Linux under tessera, and the nested suite
# (Linux to userspace under tessera inside QEMU TCG with emulated SVM).
# Installs what it needs (Debian packages) and builds or reuses the guest
# artifacts, cached outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)" >&2; }

step "test peers (QEMU, qemu-storage-daemon, fio)"
scripts/install-test-deps.sh

step "guest artifacts (kernel, rootfs, initramfs, probe guest)"
guest_dir=$(resources/build-guest.sh | tail -n 1)
export TESSERA_GUEST_DIR="$guest_dir"
echo "guest artifacts: $TESSERA_GUEST_DIR" >&2

step "format"
cargo fmt --all -- --check
(cd resources/probe-guest && cargo fmt -- --check)

step "lints"
cargo clippy --workspace --all-targets --release -- -D warnings
(cd resources/probe-guest && cargo clippy --release -- -D warnings)

step "probe guest: no instruction that an emulating KVM lacks"
resources/probe-guest/check-insns.sh "$TESSERA_GUEST_DIR/probe-guest.elf"

step "build"
cargo build --workspace --release --bins

step "fuzz smoke: every target from its corpus (scripts/fuzz.sh)"
scripts/fuzz.sh "${TESSERA_FUZZ_SECONDS:-20}"

step "tests"
cargo test --workspace --release --no-fail-fast -- --skip under_nested_svm

# Its own step, with output shown: it prints the known gaps it finds.
step "nested virtualization: real Linux under tessera inside QEMU TCG with SVM"
cargo test --release -p tessera-tests --test nested -- --nocapture
