#!/usr/bin/env bash
# Installs the Debian packages the tests drive as peers: QEMU (TCG guests,
# vhost-user frontends, qemu-storage-daemon), fio, and ip and ping for the
# network tests, and iasl (acpica-tools) for the ACPI tables. The guest build
# scripts install their own packages.
set -euo pipefail

packages=(qemu-system-x86 qemu-system-common fio util-linux iproute2 iputils-ping acpica-tools)
missing=()
for pkg in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "install these packages first: ${missing[*]}" >&2
	exit 1
fi
echo "[deps] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq "${missing[@]}" >/dev/null ||
	{ apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
