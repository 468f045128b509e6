#!/usr/bin/env bash
# Builds Tessera and boots a demo microVM.
# - With hardware virtualization (vmx or svm in /proc/cpuinfo): Linux, with
#   its root fs on a vhost-user-blk drive, to TESSERA-GUEST-UP and a shell
#   on the console.
# - Elsewhere: the probe guest, which prints what it found and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
    guest=linux
    guest_dir=$(resources/build-guest.sh | tail -n 1)
else
    guest=probe
    guest_dir=$(resources/build-guest.sh --probe-only | tail -n 1)
fi

echo "[demo] building tessera (release)" >&2
cargo build --workspace --release --bins

config=$(mktemp --suffix=.json)
trap 'rm -f "$config"' EXIT
if [ "$guest" = linux ]; then
    args="console=ttyS0 reboot=k panic=1 pci=off quiet tessera.boot_timer=1"
    # Without a terminal nobody can type `poweroff`: stop right after boot.
    [ -t 0 ] || args="$args tessera.halt=1"
    # The root fs is a private copy, served by a vhost-user-blk process
    # that tessera starts for the drive.
    rootfs=$(mktemp --suffix=.ext4)
    trap 'rm -f "$config" "$rootfs"' EXIT
    cp "$guest_dir/rootfs.ext4" "$rootfs"
    cat >"$config" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$guest_dir/vmlinux",
    "boot_args": "$args"
  },
  "drives": [
    { "drive_id": "rootfs", "path_on_host": "$rootfs", "is_root_device": true, "is_read_only": false }
  ],
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256 }
}
JSON
    echo "[demo] booting Linux ($guest_dir/vmlinux) with its root fs on vhost-user-blk; type 'poweroff' to leave" >&2
else
    # A scratch disk, served by a vhost-user-blk process tessera starts,
    # that the probe fills with a pattern and reads back.
    disk=$(mktemp --suffix=.img)
    trap 'rm -f "$config" "$disk"' EXIT
    truncate -s 16M "$disk"
    cat >"$config" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$guest_dir/probe-guest.elf",
    "boot_args": "console=ttyS0 probe.blk=write probe.blk_mib=4 probe.ticks=3"
  },
  "drives": [
    { "drive_id": "scratch", "path_on_host": "$disk", "is_root_device": false, "is_read_only": false }
  ],
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256 }
}
JSON
    echo "[demo] this CPU has no vmx/svm, so KVM here cannot run Linux at a usable speed;" >&2
    echo "[demo] booting the probe guest instead ($guest_dir/probe-guest.elf)" >&2
fi
target/x86_64-unknown-linux-gnu/release/tessera --no-api --config-file "$config" --boot-timer
