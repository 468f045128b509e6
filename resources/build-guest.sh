#!/usr/bin/env bash
# Builds the Linux guest artifacts Tessera boots in its tests:
#   vmlinux, bzImage       Debian linux-source-6.1 + resources/guest/tessera-microvm.config
#   rootfs.ext4            busybox-static + resources/guest/init + vsock-tool, ext4 image (no root needed)
#   initramfs.cpio.gz      the same tree as a gzip'd newc cpio
#   probe-guest.elf        resources/probe-guest (cargo build --release)
#
# Usage: resources/build-guest.sh [--probe-only | --no-probe]
#
# Everything is cached outside the repo, under ${TESSERA_CACHE_DIR:-~/.cache/tessera}:
#   kernel/src-<pkgver>/linux-source-6.1/   scratch tree, extracted once, rebuilt incrementally
#   kernel/<kernel-key>/                    vmlinux bzImage config
#   rootfs/<rootfs-key>/                    rootfs.ext4 initramfs.cpio.gz
#   tools/gen_init_cpio-<pkgver>            the kernel's cpio generator, built from the tarball
#   guest/<combined-key>/                   hard links to all outputs (what the caller uses)
#   logs/                                   build logs of the last runs
# The kernel key hashes the config fragment, the linux-source-6.1 version, gcc's
# version and the kernel-build functions of this script; the rootfs key hashes
# /init, the busybox-static version and the rootfs functions. So editing /init
# does not rebuild the kernel. Entries appear by rename() only once complete.
#
# Progress goes to stderr; the only stdout line is the output directory, last.

set -euo pipefail
# Most helpers run inside $(...): without this, a failing tar or cc there
# would not stop them.
shopt -s inherit_errexit

readonly REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly GUEST_DIR=$REPO/resources/guest
readonly FRAGMENT=$GUEST_DIR/tessera-microvm.config
readonly INIT_SCRIPT=$GUEST_DIR/init
readonly VSOCK_TOOL_SRC=$GUEST_DIR/vsock-tool.c
readonly PROBE_DIR=$REPO/resources/probe-guest
readonly CACHE=${TESSERA_CACHE_DIR:-$HOME/.cache/tessera}
readonly KSRC_PKG=linux-source-6.1
readonly KSRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
readonly BUSYBOX=/bin/busybox
readonly REQUIRED_PKGS=(linux-source-6.1 busybox-static build-essential flex bison bc
	libelf-dev libssl-dev cpio e2fsprogs xz-utils lz4)

# Keep stdout clean for the final path: all other output goes to stderr.
exec 3>&1 1>&2

log() { echo "[build-guest] $*" >&2; }
die() { echo "[build-guest] ERROR: $*" >&2; exit 1; }

sha256_stdin() { sha256sum | cut -d' ' -f1; }

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# ---------------------------------------------------------------------------
# Host packages
# ---------------------------------------------------------------------------

missing_packages() {
	local p
	for p in "${REQUIRED_PKGS[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
			echo "$p"
	done
}

ensure_packages() {
	local missing
	missing=$(missing_packages | paste -sd' ')
	[ -z "$missing" ] && return 0
	if [ "$(id -u)" -ne 0 ]; then
		die "missing Debian packages: $missing
  install them with: sudo apt-get install -y $missing"
	fi
	log "installing missing packages: $missing"
	export DEBIAN_FRONTEND=noninteractive
	# shellcheck disable=SC2086 # word splitting of the package list is wanted
	if ! apt-get install -y $missing; then
		log "apt-get install failed; refreshing package lists and retrying"
		apt-get update
		apt-get install -y $missing
	fi
	missing=$(missing_packages | paste -sd' ')
	[ -z "$missing" ] || die "packages still missing after apt-get: $missing"
}

# ---------------------------------------------------------------------------
# Kernel. Everything in the functions below feeds the kernel cache key
# (through `declare -f`, so comment-only edits do not trigger a rebuild).
# ---------------------------------------------------------------------------

# Extracts the Debian tarball once per package version. The tree is reused
# for every later build, so a config change costs an incremental build
# (seconds to ~2 minutes) rather than a full one (~3-8 minutes on 2 cores).
kernel_source_tree() {
	local ver=$1
	local base=$CACHE/kernel/src-$ver
	local tree=$base/linux-source-6.1
	if [ ! -e "$base/.extracted" ]; then
		log "kernel: extracting $KSRC_TARBALL ($KSRC_PKG $ver)"
		# Trees of older package versions are dead weight (~1.5 GB each).
		find "$CACHE/kernel" -maxdepth 1 -name 'src-*' ! -name "src-$ver" \
			-exec rm -rf {} + 2>/dev/null || true
		rm -rf "$base" "$base.tmp"
		mkdir -p "$base.tmp"
		tar -C "$base.tmp" -xJf "$KSRC_TARBALL"
		[ -d "$base.tmp/linux-source-6.1" ] || die "unexpected layout in $KSRC_TARBALL"
		touch "$base.tmp/.extracted"
		mv "$base.tmp" "$base"
	fi
	echo "$tree"
}

# tinyconfig needs ARCH=x86_64 (otherwise it is a 32-bit kernel); the
# fragment then goes on top and olddefconfig fills in the rest.
configure_kernel() {
	local tree=$1 logf=$2
	# Explicit returns: the caller tests our status, which disables set -e here.
	make -C "$tree" ARCH=x86_64 tinyconfig >>"$logf" 2>&1 || return 1
	"$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" "$FRAGMENT" \
		>>"$logf" 2>&1 || return 1
	make -C "$tree" ARCH=x86_64 olddefconfig >>"$logf" 2>&1 || return 1
}

# Kconfig drops a symbol whose dependencies are unmet without a word, so
# every CONFIG_X=<value> of the fragment must be found as is in the final
# .config (and every "is not set" must really be off).
verify_kernel_config() {
	local config=$1 line sym lost=() still_on=()
	while read -r line; do
		grep -qxF "$line" "$config" || lost+=("${line%%=*}")
	done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$FRAGMENT")
	while read -r sym; do
		grep -q "^$sym=" "$config" && still_on+=("$sym")
	done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$FRAGMENT")
	if [ ${#lost[@]} -gt 0 ] || [ ${#still_on[@]} -gt 0 ]; then
		[ ${#lost[@]} -gt 0 ] &&
			log "kernel config lost these symbols (unmet dependencies?): ${lost[*]}"
		[ ${#still_on[@]} -gt 0 ] &&
			log "kernel config could not turn off (selected by something?): ${still_on[*]}"
		die "kernel config check failed; see $config"
	fi
}

# The PVH entry point is an ELF note of owner "Xen", type 0x12
# (XEN_ELFNOTE_PHYS32_ENTRY); without it a PVH loader cannot boot vmlinux.
check_pvh_note() {
	readelf -n "$1" | grep -A1 -E '^ +Xen ' | grep -qE 'Unknown note type: \(0x00000012\)|PHYS32_ENTRY' ||
		die "$1 has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note; is CONFIG_PVH on?"
}

build_kernel() {
	local ver=$1 out=$2
	local tree logf tmp start
	tree=$(kernel_source_tree "$ver")
	logf=$CACHE/logs/kernel-build.log
	: >"$logf"
	log "kernel: configuring (tinyconfig + $(basename "$FRAGMENT"))"
	configure_kernel "$tree" "$logf" || die "kernel configuration failed; see $logf"
	verify_kernel_config "$tree/.config"
	log "kernel: make -j$(nproc) vmlinux bzImage (a first build takes ~3-8 min on 2 cores; log: $logf)"
	start=$SECONDS
	if ! make -C "$tree" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >>"$logf" 2>&1; then
		tail -n 40 "$logf" >&2
		die "kernel build failed; full log: $logf"
	fi
	log "kernel: built in $((SECONDS - start)) s"
	check_pvh_note "$tree/vmlinux"
	tmp=$(mktemp -d "$CACHE/kernel/.tmp.XXXXXX")
	cp "$tree/vmlinux" "$tmp/vmlinux"
	cp "$tree/arch/x86/boot/bzImage" "$tmp/bzImage"
	cp "$tree/.config" "$tmp/config"
	mv -T "$tmp" "$out"
}

kernel_key() {
	{
		echo "fragment"; cat "$FRAGMENT"
		echo "pkg $KSRC_PKG $(pkg_version "$KSRC_PKG")"
		echo "cc $(gcc --version | head -n1)"
		declare -f kernel_source_tree configure_kernel verify_kernel_config \
			check_pvh_note build_kernel
	} | sha256_stdin
}

ensure_kernel() {
	local key out
	key=$(kernel_key)
	out=$CACHE/kernel/$key
	if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
		log "kernel: cached ($out)"
	else
		build_kernel "$(pkg_version "$KSRC_PKG")" "$out"
		log "kernel: stored in $out"
	fi
	KERNEL_KEY=$key
	KERNEL_OUT=$out
}

# ---------------------------------------------------------------------------
# Rootfs and initramfs. These functions feed the rootfs cache key.
# ---------------------------------------------------------------------------

# gen_init_cpio writes device nodes (/dev/console) and root ownership into
# the archive from a text list, so neither mknod nor root is needed. It is a
# single C file in the kernel tarball; build it once per package version.
ensure_gen_init_cpio() {
	local ver tool tree
	ver=$(pkg_version "$KSRC_PKG")
	tool=$CACHE/tools/gen_init_cpio-$ver
	if [ ! -x "$tool" ]; then
		tree=$(kernel_source_tree "$ver")
		log "rootfs: compiling gen_init_cpio"
		mkdir -p "$CACHE/tools"
		cc -O2 -o "$tool.tmp" "$tree/usr/gen_init_cpio.c"
		mv "$tool.tmp" "$tool"
	fi
	echo "$tool"
}

# Lays out the guest tree: busybox plus one symlink per applet (busybox
# --install needs to run inside the target, i.e. chroot, so we make the
# links from --list-full ourselves), the init script, the usual mount points.
stage_rootfs() {
	local root=$1 applet
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,root,run,mnt,var/log}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	install -m 0755 "$BUSYBOX" "$root/bin/busybox"
	while read -r applet; do
		[ -e "$root/$applet" ] || [ -L "$root/$applet" ] && continue
		ln -s /bin/busybox "$root/$applet"
	done < <("$BUSYBOX" --list-full)
	install -m 0755 "$INIT_SCRIPT" "$root/init"
	# AF_VSOCK for the tests (busybox's nc has none), static like busybox.
	cc -O2 -static -o "$root/bin/vsock-tool" "$VSOCK_TOOL_SRC"
	# The kernel runs /init from an initramfs but /sbin/init from a block root.
	rm -f "$root/sbin/init"
	ln -s /init "$root/sbin/init"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
	printf 'tessera\n' >"$root/etc/hostname"
	ln -s /proc/mounts "$root/etc/mtab"
}

# Emits a gen_init_cpio list for the staged tree, everything owned by root,
# plus the /dev/console node the kernel opens for PID 1's stdio.
cpio_list() {
	local root=$1 path rel mode
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort) | while read -r path; do
		rel=${path#.}
		mode=$(stat -c '%a' "$root$rel")
		if [ -L "$root$rel" ]; then
			echo "slink $rel $(readlink "$root$rel") 0777 0 0"
		elif [ -d "$root$rel" ]; then
			echo "dir $rel $mode 0 0"
		else
			echo "file $rel $root$rel $mode 0 0"
		fi
	done
	# After the tree: the unpacker needs /dev to exist first.
	echo "nod /dev/console 0600 0 0 c 5 1"
}

build_rootfs() {
	local out=$1
	local tmp gen
	gen=$(ensure_gen_init_cpio)
	tmp=$(mktemp -d "$CACHE/rootfs/.tmp.XXXXXX")
	log "rootfs: staging busybox $(pkg_version busybox-static) + init"
	stage_rootfs "$tmp/root"
	log "rootfs: initramfs.cpio.gz"
	cpio_list "$tmp/root" >"$tmp/cpio.list"
	"$gen" "$tmp/cpio.list" | gzip -9 -n >"$tmp/initramfs.cpio.gz"
	log "rootfs: rootfs.ext4 (32 MiB)"
	# -d copies the tree in without loop mounts; root_owner makes / root's.
	mkfs.ext4 -q -F -b 4096 -L tessera-root -d "$tmp/root" -E root_owner=0:0 \
		"$tmp/rootfs.ext4" 32M
	rm -rf "$tmp/root" "$tmp/cpio.list"
	mv -T "$tmp" "$out"
}

rootfs_key() {
	{
		echo "init"; cat "$INIT_SCRIPT"
		echo "vsock-tool"; cat "$VSOCK_TOOL_SRC"; cc --version | head -n 1
		echo "busybox $(pkg_version busybox-static)"
		declare -f ensure_gen_init_cpio stage_rootfs cpio_list build_rootfs
	} | sha256_stdin
}

ensure_rootfs() {
	local key out
	key=$(rootfs_key)
	out=$CACHE/rootfs/$key
	if [ -f "$out/rootfs.ext4" ] && [ -f "$out/initramfs.cpio.gz" ]; then
		log "rootfs: cached ($out)"
	else
		build_rootfs "$out"
		log "rootfs: stored in $out"
	fi
	ROOTFS_KEY=$key
	ROOTFS_OUT=$out
}

# ---------------------------------------------------------------------------
# Probe guest (its own cargo workspace; cargo does the caching)
# ---------------------------------------------------------------------------

build_probe() {
	local json exe
	[ -f "$PROBE_DIR/Cargo.toml" ] || die "no probe guest crate at $PROBE_DIR (use --no-probe to skip it)"
	command -v cargo >/dev/null || die "cargo not found (needed for $PROBE_DIR; use --no-probe to skip it)"
	log "probe: cargo build --release in $PROBE_DIR"
	json=$CACHE/logs/probe-cargo.json
	# JSON messages tell us where the binary landed, whatever target triple
	# or target dir the workspace configures; human output stays on stderr.
	(cd "$PROBE_DIR" && cargo build --release --message-format=json-render-diagnostics) \
		>"$json" || die "probe guest build failed"
	exe=$(grep -F '"reason":"compiler-artifact"' "$json" |
		grep -F '"name":"probe-guest"' |
		grep -oE '"executable":"[^"]+"' | tail -n1 | sed -E 's/^"executable":"(.*)"$/\1/')
	[ -n "$exe" ] || exe=$PROBE_DIR/target/x86_64-unknown-linux-gnu/release/probe-guest
	[ -f "$exe" ] || die "probe guest binary not found (looked for $exe)"
	PROBE_ELF=$exe
}

# ---------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------

# Hard links keep the guest/ entries free; copies if the cache spans
# filesystems.
link_into() {
	local src=$1 dir=$2 name=$3
	ln -f "$src" "$dir/$name" 2>/dev/null || cp -f "$src" "$dir/$name"
}

assemble_output() {
	local combined dir tmp probe_sum=none
	[ -n "${PROBE_ELF:-}" ] && probe_sum=$(sha256sum "$PROBE_ELF" | cut -d' ' -f1)
	combined=$(printf 'kernel=%s\nrootfs=%s\nprobe=%s\n' \
		"${KERNEL_KEY:-none}" "${ROOTFS_KEY:-none}" "$probe_sum" | sha256_stdin)
	dir=$CACHE/guest/$combined
	if [ ! -d "$dir" ]; then
		mkdir -p "$CACHE/guest"
		tmp=$(mktemp -d "$CACHE/guest/.tmp.XXXXXX")
		if [ -n "${KERNEL_OUT:-}" ]; then
			link_into "$KERNEL_OUT/vmlinux" "$tmp" vmlinux
			link_into "$KERNEL_OUT/bzImage" "$tmp" bzImage
			link_into "$KERNEL_OUT/config" "$tmp" kernel.config
		fi
		if [ -n "${ROOTFS_OUT:-}" ]; then
			link_into "$ROOTFS_OUT/rootfs.ext4" "$tmp" rootfs.ext4
			link_into "$ROOTFS_OUT/initramfs.cpio.gz" "$tmp" initramfs.cpio.gz
		fi
		# The probe binary is overwritten by every cargo build: copy it.
		[ -n "${PROBE_ELF:-}" ] && cp "$PROBE_ELF" "$tmp/probe-guest.elf"
		chmod 0755 "$tmp"
		mv -T "$tmp" "$dir"
	fi
	OUTPUT_DIR=$dir
}

usage() {
	echo "usage: $0 [--probe-only | --no-probe]" >&2
	exit 2
}

main() {
	local want_system=1 want_probe=1
	while [ $# -gt 0 ]; do
		case "$1" in
		--probe-only) want_system=0 ;;
		--no-probe) want_probe=0 ;;
		-h | --help) usage ;;
		*) log "unknown option: $1"; usage ;;
		esac
		shift
	done
	[ "$want_system" = 1 ] || [ "$want_probe" = 1 ] ||
		die "--probe-only and --no-probe together leave nothing to build"

	mkdir -p "$CACHE"/{kernel,rootfs,guest,logs,tools}
	# One build at a time per cache: the kernel scratch tree is shared.
	exec 9>"$CACHE/.lock"
	if ! flock -n 9; then
		log "waiting for another build-guest.sh to finish (lock $CACHE/.lock)"
		flock 9
	fi
	# Leftovers of interrupted runs (never complete entries: those are renamed).
	rm -rf "$CACHE"/kernel/.tmp.* "$CACHE"/rootfs/.tmp.* "$CACHE"/guest/.tmp.*

	if [ "$want_system" = 1 ]; then
		ensure_packages
		ensure_kernel
		ensure_rootfs
	fi
	if [ "$want_probe" = 1 ]; then
		build_probe
	fi
	assemble_output
	log "done: $(ls "$OUTPUT_DIR" | tr '\n' ' ')"
	echo "$OUTPUT_DIR" >&3
}

main "$@"
