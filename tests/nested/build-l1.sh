#!/usr/bin/env bash
# Builds the L1 side of the nested-virtualization suite:
#   vmlinuz            Debian's cloud kernel (linux-image-*-cloud-amd64-unsigned),
#                      fetched with `apt-get download`, unpacked with `dpkg-deb -x`
#   initramfs.cpio.gz  busybox, the kernel's KVM modules, the release binaries
#                      with their shared libraries, the L2 guest artifacts and
#                      runner.sh as /init
# Cached under ${TESSERA_CACHE_DIR:-~/.cache/tessera}/nested, keyed by a hash of
# every input. Progress goes to stderr; the last stdout line is the directory.
# With --stock-kernel it only fetches Debian's cloud kernel and prints the
# path of its vmlinuz (for the early-boot test under this host's KVM).
#
# Inputs: TESSERA_BIN_DIR (default: target/x86_64-unknown-linux-gnu/release), TESSERA_GUEST_DIR (the L2
# artifacts; default: built with resources/build-guest.sh), and optionally
# TESSERA_NESTED_PEERS, a directory whose `firecracker` and
# `cloud-hypervisor` binaries go into L1 as /opt/peers/<name>, for the
# benchmarks to run beside tessera.
set -euo pipefail

exec 3>&1 1>&2
log() { echo "[build-l1] $*" >&2; }
die() { log "error: $*"; exit 1; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${TESSERA_CACHE_DIR:-$HOME/.cache/tessera}/nested
bin_dir=${TESSERA_BIN_DIR:-$repo/target/x86_64-unknown-linux-gnu/release}
binaries=(tessera vhost-user-blk vhost-user-net vhost-user-vsock jailer tessera-bench api-call)
mkdir -p "$cache"

ensure_packages() {
	local missing=()
	for pkg in busybox-static cpio kmod gzip qemu-system-x86; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
	done
	[ ${#missing[@]} -eq 0 ] && return
	[ "$(id -u)" -eq 0 ] || die "install these packages first: ${missing[*]}"
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# The versioned unsigned cloud kernel package the meta-package points at.
kernel_package() {
	local pkg
	pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
	if [ -z "$pkg" ]; then
		apt-get update -qq
		pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
	fi
	[ -n "$pkg" ] || die "cannot find the linux-image-cloud-amd64 package"
	echo "$pkg-unsigned"
}

# Unpacks the kernel package once; prints its directory.
unpack_kernel() {
	local pkg=$1 dir=$cache/kernel/$1
	if [ ! -d "$dir" ]; then
		log "downloading $pkg"
		local tmp
		tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
		(cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
		dpkg-deb -x "$tmp"/*.deb "$tmp/root"
		mkdir -p "$cache/kernel"
		mv "$tmp/root" "$dir"
		rm -rf "$tmp"
	fi
	echo "$dir"
}

# Prints MODULE and its dependencies, dependencies first, once each.
declare -A seen_modules=()
module_closure() {
	local root=$1 name=$2 file dep
	[ -n "${seen_modules[$name]:-}" ] && return
	seen_modules[$name]=1
	file=$(find "$root" -name "$name.ko" -print -quit)
	[ -n "$file" ] || die "module $name not found in the kernel package"
	for dep in $(modinfo -F depends "$file" | tr ',' ' '); do
		module_closure "$root" "$dep"
	done
	echo "$name"
}

# Copies the modules (and their dependencies) into DEST/lib/modules, flat,
# and writes their load order to DEST/ORDER_FILE.
stage_modules() {
	local root=$1 dest=$2 order_file=$3
	shift 3
	seen_modules=()
	mkdir -p "$dest/lib/modules" "$(dirname "$dest/$order_file")"
	: >"$dest/$order_file"
	for module in "$@"; do
		module_closure "$root" "$module"
	done | while read -r name; do
		cp "$(find "$root" -name "$name.ko" -print -quit)" "$dest/lib/modules/"
		echo "$name" >>"$dest/$order_file"
	done
}

gen_init_cpio_tool() {
	local tool
	tool=$(ls "$cache"/../tools/gen_init_cpio-* 2>/dev/null | head -n 1 || true)
	if [ -z "$tool" ]; then
		tool=$cache/gen_init_cpio
		if [ ! -x "$tool" ]; then
			log "compiling gen_init_cpio from linux-source-6.1"
			tar -xJf /usr/src/linux-source-6.1.tar.xz --wildcards -O '*/usr/gen_init_cpio.c' >"$cache/gen_init_cpio.c"
			cc -O2 -o "$tool" "$cache/gen_init_cpio.c"
		fi
	fi
	echo "$tool"
}

# Writes a gzip'd newc archive of DIR to OUT, with /dev/console (no root needed).
pack_cpio() {
	local dir=$1 out=$2 list
	list=$(mktemp)
	echo "nod /dev/console 0600 0 0 c 5 1" >>"$list"
	(cd "$dir" && find . -mindepth 1 | sort) | while read -r path; do
		local p=${path#.} src=$dir/${path#./}
		if [ -L "$src" ]; then
			echo "slink $p $(readlink "$src") 0777 0 0"
		elif [ -d "$src" ]; then
			echo "dir $p 0755 0 0"
		else
			echo "file $p $src $(stat -c %a "$src") 0 0"
		fi
	done >>"$list"
	"$(gen_init_cpio_tool)" "$list" | gzip -6 >"$out"
	rm -f "$list"
}

# Copies BINARY and the shared libraries ldd names into DEST at the same paths.
stage_binary() {
	local binary=$1 dest=$2 lib
	cp "$binary" "$dest/opt/tessera/bin/"
	for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
		mkdir -p "$dest$(dirname "$lib")"
		cp -L "$lib" "$dest$lib"
	done
}

stage_busybox() {
	local dest=$1 applet
	mkdir -p "$dest/bin"
	cp /bin/busybox "$dest/bin/busybox"
	for applet in $(/bin/busybox --list); do
		[ -e "$dest/bin/$applet" ] || ln -s busybox "$dest/bin/$applet"
	done
}

# The peer binary NAME, if TESSERA_NESTED_PEERS names a directory with one.
peer() {
	local bin=${TESSERA_NESTED_PEERS:+$TESSERA_NESTED_PEERS/$1}
	[ -n "$bin" ] && [ -x "$bin" ] && echo "$bin"
	return 0
}
readonly PEERS=(firecracker cloud-hypervisor)

main() {
	if [ "${1:-}" = --stock-kernel ]; then
		local kernel_dir
		kernel_dir=$(unpack_kernel "$(kernel_package)")
		ls "$kernel_dir"/boot/vmlinuz-* | head -n 1 >&3
		return
	fi
	ensure_packages
	local guest_dir=${TESSERA_GUEST_DIR:-}
	[ -n "$guest_dir" ] || guest_dir=$("$repo/resources/build-guest.sh" 3>&- | tail -n 1)
	for f in vmlinux bzImage initramfs.cpio.gz rootfs.ext4 probe-guest.elf; do
		[ -f "$guest_dir/$f" ] || die "missing L2 artifact $guest_dir/$f"
	done
	for b in "${binaries[@]}"; do
		[ -x "$bin_dir/$b" ] || die "missing $bin_dir/$b: run cargo build --workspace --release --bins"
	done

	local pkg kernel_dir kver key out
	pkg=$(kernel_package)
	kernel_dir=$(unpack_kernel "$pkg")
	kver=$(ls "$kernel_dir/lib/modules")
	key=$({
		echo "$pkg"
		cat "$0" "$repo/tests/nested/runner.sh" "$repo/resources/guest/vsock-tool.c"
		(cd "$bin_dir" && sha256sum "${binaries[@]}")
		(cd "$guest_dir" && sha256sum vmlinux bzImage initramfs.cpio.gz rootfs.ext4 probe-guest.elf)
		dpkg-query -W -f='${Version}' busybox-static
		for name in "${PEERS[@]}"; do
			[ -z "$(peer "$name")" ] || sha256sum "$(peer "$name")"
		done
	} | sha256sum | cut -c1-32)
	out=$cache/l1-$key
	if [ -f "$out/initramfs.cpio.gz" ]; then
		log "cached: $out"
		echo "$out" >&3
		return
	fi

	log "staging the L1 initramfs ($pkg)"
	local stage tmp
	tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
	stage=$tmp/root
	mkdir -p "$stage"/{proc,sys,dev,tmp,etc,opt/tessera/bin,opt/l2}
	stage_busybox "$stage"
	stage_modules "$kernel_dir/lib/modules/$kver" "$stage" etc/modules.order kvm-amd tun
	for b in "${binaries[@]}"; do
		stage_binary "$bin_dir/$b" "$stage"
	done
	# The host side of the vsock scenario (L1 has no scripting language).
	cc -O2 -static -o "$stage/opt/tessera/bin/vsock-tool" "$repo/resources/guest/vsock-tool.c"
	# iproute2's ip: busybox's tunctl cannot give a TAP an owner, which the
	# jailer's launcher requires of a TAP outside a netns of the VMM's own.
	stage_binary "$(command -v ip)" "$stage"
	for name in "${PEERS[@]}"; do
		[ -n "$(peer "$name")" ] || continue
		mkdir -p "$stage/opt/peers"
		stage_binary "$(peer "$name")" "$stage"
		mv "$stage/opt/tessera/bin/$name" "$stage/opt/peers/"
	done
	cp "$guest_dir"/{vmlinux,bzImage,initramfs.cpio.gz,rootfs.ext4,probe-guest.elf} "$stage/opt/l2/"
	cp "$repo/tests/nested/runner.sh" "$stage/init"
	chmod 0755 "$stage/init"

	log "building the stock-kernel L2 initramfs"
	cp "$kernel_dir/boot/vmlinuz-$kver" "$stage/opt/l2/stock-vmlinuz"
	local extra=$tmp/stock-extra
	mkdir -p "$extra"
	stage_modules "$kernel_dir/lib/modules/$kver" "$extra" etc/tessera-modules virtio_mmio virtio_pci virtio_blk virtio_net
	# The kernel unpacks concatenated archives in order: ours, then the modules.
	pack_cpio "$extra" "$tmp/stock-extra.cpio.gz"
	cat "$guest_dir/initramfs.cpio.gz" "$tmp/stock-extra.cpio.gz" >"$stage/opt/l2/stock-initramfs.cpio.gz"

	log "packing the L1 initramfs"
	mkdir -p "$tmp/out"
	cp "$kernel_dir/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
	pack_cpio "$stage" "$tmp/out/initramfs.cpio.gz"
	rm -rf "$out"
	mv "$tmp/out" "$out"
	rm -rf "$tmp"
	log "done: $out ($(du -sh "$out/initramfs.cpio.gz" | cut -f1) initramfs)"
	echo "$out" >&3
}

main "$@"
