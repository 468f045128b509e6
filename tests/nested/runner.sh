#!/bin/sh
# L1 /init for the nested-virtualization suite. Runs inside a Debian cloud
# kernel under QEMU TCG (emulated AMD SVM): loads KVM, then runs each
# scenario named in `nested.scenarios=a,b,c` on the kernel command line
# against tessera and an L2 Linux guest. Prints one line per scenario,
#   nested.<name>=ok <details>   or   nested.<name>=fail <why>
# and known gaps as `nested.<name>.gap=<what>`, then `nested.end` and powers off.
#
# Layout of this initramfs: /opt/tessera/bin (tessera and friends, with their
# shared libraries under /lib*), /opt/l2 (guest artifacts), /lib/modules/*.ko
# and /etc/modules.order (KVM modules in load order).

PATH=/opt/tessera/bin:/sbin:/bin:/usr/sbin:/usr/bin
export PATH

mount -t proc proc /proc
# The jailer's pivot_root cannot leave an initramfs (rootfs): for the
# jailed scenarios, PID 1 first moves everything to a tmpfs and switches
# to it, as a real host's root file system would be.
if [ -z "$NESTED_ON_TMPFS" ] && grep -q 'nested\.scenarios=[^ ]*jailed' /proc/cmdline; then
	mkdir -p /newroot
	mount -t tmpfs -o mode=0755 tmpfs /newroot
	for entry in /*; do
		case "$entry" in
		/proc | /sys | /dev | /tmp | /newroot) mkdir -p "/newroot$entry" ;;
		*) cp -a "$entry" /newroot/ ;;
		esac
	done
	umount /proc
	export NESTED_ON_TMPFS=1
	exec switch_root /newroot /init
fi
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

L2=/opt/l2
SCENARIO_TIMEOUT=120

# In the jailed_* scenarios PREFIX is "jailed_" and JAILED is set.
PREFIX=
JAILED=
JAIL_BASE=/tmp/jail
JAIL_UID=123

ok() { echo "nested.$PREFIX$1=ok $2"; }
fail() { echo "nested.$PREFIX$1=fail $2"; }

# jail_root NAME: the jail of run NAME (jailer ids take no '_').
jail_id() { echo "jailed-$1" | tr _ -; }
jail_root() { echo "$JAIL_BASE/tessera/$(jail_id "$1")/root"; }

# stage NAME FILE: FILE as a config names it. In a jailed run the file is
# copied into NAME's jail, owned by the jailed uid, and named relative to
# the jail root, as with Firecracker's jailer.
stage() {
	if [ -n "$JAILED" ]; then
		root=$(jail_root "$1")
		mkdir -p "$root"
		cp "$2" "$root/" && chown "$JAIL_UID:$JAIL_UID" "$root/$(basename "$2")"
		basename "$2"
	else
		echo "$2"
	fi
}

# on_host NAME FILE: where a file the config names as FILE is in L1.
on_host() {
	if [ -n "$JAILED" ]; then echo "$(jail_root "$1")/$2"; else echo "$2"; fi
}

# run_tessera NAME CONFIG [tessera flags...]: tessera on CONFIG, started
# by the jailer (its backends jailed by the jailer's launcher) in a jailed run.
run_tessera() {
	name=$1 config=$2
	shift 2
	if [ -n "$JAILED" ]; then
		root=$(jail_root "$name")
		mkdir -p "$root"
		cp "$config" "$root/vm.json"
		timeout -s KILL "$SCENARIO_TIMEOUT" jailer --id "$(jail_id "$name")" \
			--exec-file /opt/tessera/bin/tessera --uid "$JAIL_UID" --gid "$JAIL_UID" \
			--chroot-base-dir "$JAIL_BASE" -- --config-file vm.json "$@"
	else
		timeout -s KILL "$SCENARIO_TIMEOUT" tessera --config-file "$config" "$@"
	fi
}

finish() {
	echo "nested.end"
	poweroff -f
	# Without ACPI power-off QEMU still ends on the i8042 reset (-no-reboot).
	reboot -f
}

echo "nested.l1=up kernel=$(uname -r) cpus=$(nproc)"
while read -r module; do
	insmod "/lib/modules/$module.ko" || fail modules "insmod $module"
done </etc/modules.order
if [ ! -c /dev/kvm ]; then
	fail kvm "no /dev/kvm after loading $(tr '\n' ' ' </etc/modules.order)"
	finish
fi
echo "nested.kvm=ok $(grep -c svm /proc/cpuinfo) svm cpus"

# run_vm NAME KERNEL INITRD VCPUS MEM_MIB BOOT_ARGS [tessera flags...]
# Boots an L2 guest; leaves its console in /tmp/NAME.out, the VMM log in
# /tmp/NAME.err and the exit status in $vm_status.
run_vm() {
	name=$1 kernel=$(stage "$1" "$2") initrd=$(stage "$1" "$3") vcpus=$4 mem=$5 args=$6
	shift 6
	cat >"/tmp/$name.json" <<JSON
{
  "boot-source": {"kernel_image_path": "$kernel", "initrd_path": "$initrd", "boot_args": "$args"},
  "machine-config": {"vcpu_count": $vcpus, "mem_size_mib": $mem}
}
JSON
	run_tessera "$name" "/tmp/$name.json" --no-api "$@" \
		</dev/null >"/tmp/$name.out" 2>"/tmp/$name.err"
	vm_status=$?
}

# value KEY FILE: the value of the last `KEY=value` line in FILE.
value() {
	sed -n "s/^$1=//p" "$2" | tr -d '\r' | tail -n 1
}

# why NAME: a one-line reason from a failed run.
why() {
	tail -n 6 "/tmp/$1.err" "/tmp/$1.out" 2>/dev/null | tr -d '\r' | tr '\n' ' ' | cut -c1-1200
}

BASE_ARGS="console=ttyS0 reboot=k panic=-1 pci=off quiet"

# check_linux NAME KERNEL VCPUS MEM_MIB: TESSERA-GUEST-UP, nproc and MemTotal.
check_linux() {
	name=$1 kernel=$2 vcpus=$3 mem=$4
	run_vm "$name" "$kernel" "$L2/initramfs.cpio.gz" "$vcpus" "$mem" "$BASE_ARGS tessera.halt=1"
	out=/tmp/$name.out
	if [ "$vm_status" -ne 0 ]; then
		fail "$name" "tessera exited with $vm_status: $(why "$name")"
	elif ! grep -q TESSERA-GUEST-UP "$out"; then
		fail "$name" "no TESSERA-GUEST-UP: $(why "$name")"
	else
		nproc=$(value tessera.nproc "$out")
		memtotal=$(value tessera.memtotal_kb "$out")
		mem_kb=$((mem * 1024))
		if [ "$nproc" != "$vcpus" ]; then
			fail "$name" "nproc=$nproc, want $vcpus"
		elif [ "$memtotal" -le $((mem_kb * 8 / 10)) ] || [ "$memtotal" -gt "$mem_kb" ]; then
			fail "$name" "MemTotal ${memtotal} kB does not match ${mem} MiB"
		else
			ok "$name" "nproc=$nproc memtotal_kb=$memtotal"
		fi
	fi
}

# check_exit NAME ARG: the guest runs `ARG` (reboot or poweroff) and the VMM
# must end with status 0.
check_exit() {
	name=$1 how=$2
	run_vm "$name" "$L2/vmlinux" "$L2/initramfs.cpio.gz" 1 256 "$BASE_ARGS tessera.$how=1"
	if [ "$vm_status" -eq 0 ] && grep -q TESSERA-GUEST-UP "/tmp/$name.out"; then
		ok "$name" "guest $how ended tessera with status 0"
	else
		fail "$name" "status $vm_status after guest $how: $(why "$name")"
	fi
}

scenario_initramfs() { check_linux initramfs "$L2/vmlinux" 2 1024; }
scenario_bzimage() { check_linux bzimage "$L2/bzImage" 2 1024; }
scenario_reboot() { check_exit reboot reboot; }
scenario_poweroff() { check_exit poweroff poweroff; }

# SendCtrlAltDel through the API reaches the guest kernel through the
# i8042 keyboard, and its reboot ends tessera with status 0.
scenario_ctrl_alt_del() {
	name=ctrl_alt_del
	cat >/tmp/$name.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux", "initrd_path": "$L2/initramfs.cpio.gz",
                  "boot_args": "$BASE_ARGS i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
}
JSON
	tessera --api-sock /tmp/$name.sock --config-file /tmp/$name.json \
		</dev/null >/tmp/$name.out 2>/tmp/$name.err &
	pid=$!
	(sleep "$SCENARIO_TIMEOUT"; kill -9 "$pid" 2>/dev/null) &
	watchdog=$!
	waited=0
	while ! grep -q TESSERA-GUEST-UP /tmp/$name.out && [ "$waited" -lt 600 ]; do
		sleep 0.1
		waited=$((waited + 1))
	done
	answer=$(api-call /tmp/$name.sock PUT /actions '{"action_type": "SendCtrlAltDel"}')
	wait "$pid"
	status=$?
	kill "$watchdog" 2>/dev/null
	if [ "$status" -eq 0 ] && grep -q TESSERA-GUEST-UP /tmp/$name.out; then
		ok "$name" "the guest rebooted on Ctrl+Alt+Del; tessera exited 0 (API: $answer)"
	else
		fail "$name" "status $status, API: $answer: $(why "$name")"
	fi
}

scenario_boot_timer() {
	run_vm boot_timer "$L2/vmlinux" "$L2/initramfs.cpio.gz" 1 256 \
		"$BASE_ARGS tessera.boot_timer=1 tessera.halt=1" --boot-timer
	line=$(grep -o 'Guest-boot-time = .*' /tmp/boot_timer.err)
	if [ "$vm_status" -eq 0 ] && [ -n "$line" ]; then
		ok boot_timer "$line"
	else
		fail boot_timer "status $vm_status, no Guest-boot-time: $(why boot_timer)"
	fi
}

# Block: L2's root file system on a drive served by a vhost-user-blk that
# tessera starts, and a data drive the guest fills with dd; the bytes are
# checked on L1's file. With is_read_only the root mounts read-only.
scenario_blk() {
	name=blk_root ro=$1
	[ "$ro" = true ] && name=blk_readonly
	cp "$L2/rootfs.ext4" /tmp/$name-root.ext4
	rm -f /tmp/$name-data.img
	truncate -s 8M /tmp/$name-data.img
	kernel=$(stage "$name" "$L2/vmlinux")
	root_disk=$(stage "$name" /tmp/$name-root.ext4)
	data_disk=$(stage "$name" /tmp/$name-data.img)
	cat >/tmp/$name.json <<JSON
{
  "boot-source": {"kernel_image_path": "$kernel",
                  "boot_args": "$BASE_ARGS tessera.dd=/dev/vdb:4 tessera.halt=1"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
  "drives": [
    {"drive_id": "rootfs", "path_on_host": "$root_disk", "is_root_device": true, "is_read_only": $ro},
    {"drive_id": "data", "path_on_host": "$data_disk", "is_root_device": false, "is_read_only": false}
  ]
}
JSON
	run_tessera "$name" /tmp/$name.json --no-api </dev/null >/tmp/$name.out 2>/tmp/$name.err
	status=$?
	out=/tmp/$name.out
	want=$(yes TESSERA | head -c 4194304 | md5sum | cut -d' ' -f1)
	got=$(head -c 4194304 "$(on_host "$name" "$data_disk")" | md5sum | cut -d' ' -f1)
	writable=$(value tessera.root_writable "$out")
	expect_writable=yes
	[ "$ro" = true ] && expect_writable=no
	if [ "$status" -ne 0 ] || ! grep -q TESSERA-GUEST-UP "$out"; then
		fail "$name" "status $status: $(why "$name")"
	elif ! grep -q "tessera.dd=ok /dev/vdb 4" "$out"; then
		fail "$name" "the guest's dd failed: $(why "$name")"
	elif [ "$got" != "$want" ]; then
		fail "$name" "the data drive holds the wrong bytes (md5 $got, want $want)"
	elif [ "$writable" != "$expect_writable" ]; then
		fail "$name" "root_writable=$writable, want $expect_writable"
	else
		ok "$name" "root on vhost-user-blk (writable=$writable); 4 MiB written by dd match on the host"
	fi
}

# L2 Linux on vhost-user-net over a TAP in L1, its eth0 set up by ip=:
# L2 pings L1 and L1 pings L2 (1400-byte payloads), then 16 MiB go over
# HTTP (busybox httpd and wget) each way and their md5 sums must match.
scenario_net() {
	name=net
	ip link del tap0 2>/dev/null
	# The launcher attaches only a TAP the VMM's uid could open itself: the
	# orchestrator makes it for that uid, as for Firecracker.
	if ! /opt/tessera/bin/ip tuntap add dev tap0 mode tap user "$JAIL_UID" group "$JAIL_UID" ||
		! ip addr add 10.99.0.1/24 dev tap0 ||
		! ip link set tap0 up; then
		fail net "cannot set up tap0 in L1"
		return
	fi
	mkdir -p /tmp/www
	yes TESSERA | head -c 16777216 >/tmp/www/blob
	want=$(md5sum </tmp/www/blob | cut -d' ' -f1)
	httpd -p 8080 -h /tmp/www
	kernel=$(stage net "$L2/vmlinux")
	initrd=$(stage net "$L2/initramfs.cpio.gz")
	rm -f /tmp/net.out
	cat >/tmp/net.json <<JSON
{
  "boot-source": {"kernel_image_path": "$kernel", "initrd_path": "$initrd",
                  "boot_args": "$BASE_ARGS ip=10.99.0.2::10.99.0.1:255.255.255.0::eth0:off tessera.ping=10.99.0.1 tessera.transfer=10.99.0.1 tessera.wait=30 tessera.halt=1"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:63:00:02"}]
}
JSON
	run_tessera net /tmp/net.json --no-api </dev/null >/tmp/net.out 2>/tmp/net.err &
	vm=$!
	waited=0
	while ! grep -q "^tessera.fetch=" /tmp/net.out && [ $waited -lt 90 ]; do
		sleep 1
		waited=$((waited + 1))
	done
	# In a jailed run, the VMM and its backend must be confined while they
	# serve: the jailed uid, seccomp, each in its own jail.
	confinement=
	for exe in tessera vhost-user-net; do
		[ -n "$JAILED" ] || break
		pid=$(pidof "$exe" | cut -d' ' -f1)
		uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
		seccomp=$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
		root=$(awk '$5 == "/" {print $4}' "/proc/$pid/mountinfo" 2>/dev/null | head -n 1)
		confinement="$confinement $exe:uid=$uid,seccomp=$seccomp,root=$root"
		# The VMM's jail is /jail/tessera/<id>/root; a backend's nests in its
		# VM's instance directory: /jail/tessera/<id>/<backend>/<device>/root.
		case "$exe,$uid,$seccomp,$root" in
		"tessera,$JAIL_UID,2,/jail/tessera/"*/root) ;;
		"$exe,$JAIL_UID,2,/jail/tessera/"*"/$exe/"*/root) ;;
		*) confinement="$confinement(NOT-CONFINED)" ;;
		esac
	done
	set -- $(ping -c 5 -W 2 -s 1400 10.99.0.2 2>&1 | grep 'packets transmitted')
	l1_received=${4:-0}
	got_from_l2=$(wget -q -O - http://10.99.0.2:8080/blob | md5sum | cut -d' ' -f1)
	wait $vm
	status=$?
	out=/tmp/net.out
	guest_ping=$(value tessera.ping "$out")
	guest_addr=$(value tessera.eth0 "$out")
	got_by_l2=$(value tessera.fetch "$out")
	if [ "$status" -ne 0 ] || ! grep -q TESSERA-GUEST-UP "$out"; then
		fail net "status $status: $(why net)"
	elif [ "$guest_addr" != 10.99.0.2/24 ]; then
		fail net "the guest's eth0 is $guest_addr, want 10.99.0.2/24: $(why net)"
	elif [ "${guest_ping%% *}" != ok ]; then
		fail net "L2 -> L1 ping: $guest_ping"
	elif [ "$l1_received" != 5 ]; then
		fail net "L1 -> L2 ping: $l1_received of 5 replies"
	elif [ "$got_by_l2" != "$want" ]; then
		fail net "16 MiB L1 -> L2: md5 $got_by_l2, want $want"
	elif [ "$got_from_l2" != "$want" ]; then
		fail net "16 MiB L2 -> L1: md5 $got_from_l2, want $want"
	elif [ "${confinement#*NOT-CONFINED}" != "$confinement" ]; then
		fail net "not confined:$confinement"
	else
		ok net "eth0=$guest_addr on vhost-user-net; L2 -> L1 ping $guest_ping, L1 -> L2 5/5; 16 MiB over HTTP each way, md5 $want$confinement"
	fi
	kill "$(pidof httpd)" 2>/dev/null
}

# The same scenarios with tessera started by the jailer (uid 123, pivoted
# into its jail) and each backend started by the jailer's launcher in a
# jail of its own: the results must match the unjailed runs.
jailed() {
	PREFIX=jailed_ JAILED=1
	"$@"
	PREFIX= JAILED=
}
scenario_jailed_initramfs() { jailed scenario_initramfs; }
scenario_jailed_blk_root() { jailed scenario_blk_root; }
scenario_jailed_net() { jailed scenario_net; }

# vsock: Linux's virtio-vsock driver under tessera and vhost-user-vsock,
# both ways, through Firecracker's hybrid socket: an L1 client echoes
# 4 MiB through the guest's listener (CONNECT 52), and the guest sends
# 1 MiB to /tmp/v.sock_5001; each side checks the pattern.
scenario_vsock() {
	name=vsock
	rm -f /tmp/v.sock /tmp/v.sock_5001 /tmp/vsock.out
	vsock-tool host-recv /tmp/v.sock_5001 1048576 >/tmp/vsock-recv.err 2>&1 &
	recv=$!
	cat >/tmp/vsock.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux", "initrd_path": "$L2/initramfs.cpio.gz",
                  "boot_args": "$BASE_ARGS tessera.vsock_echo=52 tessera.vsock_send=5001:1048576 tessera.halt=1"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}
}
JSON
	run_tessera vsock /tmp/vsock.json --no-api </dev/null >/tmp/vsock.out 2>/tmp/vsock.err &
	vm=$!
	waited=0
	while ! grep -q "vsock-tool: listening on 52" /tmp/vsock.out && [ $waited -lt 90 ]; do
		sleep 1
		waited=$((waited + 1))
	done
	vsock-tool host-echo /tmp/v.sock 52 4194304 >/tmp/vsock-echo.err 2>&1
	echoed=$?
	wait "$vm"
	vm_status=$?
	wait "$recv"
	received=$?
	if [ "$vm_status" -ne 0 ]; then
		fail vsock "tessera exited with $vm_status: $(why vsock)"
	elif [ "$echoed" -ne 0 ]; then
		fail vsock "host echo: $(tr '\n' ' ' </tmp/vsock-echo.err) $(why vsock)"
	elif [ "$received" -ne 0 ]; then
		fail vsock "guest to host: $(tr '\n' ' ' </tmp/vsock-recv.err) $(why vsock)"
	elif ! grep -q "tessera.vsock_echo=done" /tmp/vsock.out ||
		! grep -q "tessera.vsock_send=ok 1048576" /tmp/vsock.out; then
		fail vsock "the guest did not report both transfers: $(why vsock)"
	else
		ok vsock "4 MiB echoed through the guest, 1 MiB from the guest, checked"
	fi
}

scenario_blk_root() { scenario_blk false; }
scenario_blk_readonly() { scenario_blk true; }

# Debian's stock cloud kernel as L2 (bzImage), with an initramfs that loads
# its virtio modules, then mounts its root on our vhost-user-blk (vda) and
# goes on there; its NIC on our vhost-user-net pings L1. With FLAGS
# "--enable-pci" every device must be a PCI function with MSI-X, found
# through ACPI's MCFG and PC00; without, a virtio-mmio device the DSDT
# describes. It has no MP-table parser, so its CPUs come from the MADT,
# and its poweroff -f goes through ACPI and must end tessera with status 0.
check_stock_kernel() {
	name=$1 flags=$2 vcpus=2
	ip link del tap0 2>/dev/null
	if ! /opt/tessera/bin/ip tuntap add dev tap0 mode tap || ! ip addr add 10.99.0.1/24 dev tap0 ||
		! ip link set tap0 up; then
		fail "$name" "cannot set up tap0 in L1"
		return
	fi
	cp "$L2/rootfs.ext4" "/tmp/$name-root.ext4"
	cat >/tmp/$name.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/stock-vmlinuz", "initrd_path": "$L2/stock-initramfs.cpio.gz",
                  "boot_args": "console=ttyS0 reboot=k panic=-1 quiet tessera.switch_root=/dev/vda tessera.ip=10.99.0.2/24 tessera.ping=10.99.0.1 tessera.pci=1 tessera.acpi_poweroff=1"},
  "machine-config": {"vcpu_count": $vcpus, "mem_size_mib": 512},
  "drives": [{"drive_id": "root", "path_on_host": "/tmp/$name-root.ext4", "is_root_device": true, "is_read_only": false}],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:63:00:02"}]
}
JSON
	run_tessera "$name" /tmp/$name.json --no-api $flags </dev/null >"/tmp/$name.out" 2>"/tmp/$name.err"
	status=$?
	ip link del tap0 2>/dev/null
	out=/tmp/$name.out
	nproc=$(value tessera.nproc "$out")
	devices=$(value tessera.virtio_devices "$out")
	functions=$(value tessera.pci_devices "$out")
	mmio=$(value tessera.virtio_mmio "$out")
	ping=$(value tessera.ping "$out")
	if [ -n "$flags" ]; then
		want_functions="0000:00:00.0=8086:0d57,0000:00:01.0=1af4:1042,0000:00:02.0=1af4:1041"
		want_mmio=0
	else
		want_functions=
		want_mmio=2
	fi
	if ! grep -q TESSERA-GUEST-UP "$out"; then
		fail "$name" "status $status: $(why "$name")"
	elif [ "$nproc" != "$vcpus" ]; then
		fail "$name" "sees $nproc of $vcpus CPUs (the ACPI MADT lists them): $(why "$name")"
	elif [ "$devices" != 2 ] || [ "$functions" != "$want_functions" ] || [ "$mmio" != "$want_mmio" ]; then
		fail "$name" "virtio devices ${devices:-none}, PCI functions ${functions:-none}, virtio-mmio ${mmio:-none}: $(why "$name")"
	elif [ "$(value tessera.switch_root "$out")" != /dev/vda ] || [ "$(value tessera.root_writable "$out")" != yes ]; then
		fail "$name" "no writable root on vda: $(why "$name")"
	elif [ "${ping%% *}" != ok ]; then
		fail "$name" "L2 -> L1 ping over its NIC: $ping"
	elif [ -n "$flags" ] && ! value tessera.msi "$out" | grep -q 'virtio1-input.0'; then
		fail "$name" "no MSI-X vectors: tessera.msi=$(value tessera.msi "$out")"
	elif [ "$status" -ne 0 ]; then
		fail "$name" "poweroff -f through ACPI ended tessera with status $status: $(why "$name")"
	else
		ok "$name" "booted $(value tessera.kernel "$out") ($(value tessera.modules "$out")); $nproc CPUs; root on vda (writable), ping $ping over eth0; PCI functions: ${functions:-none}, virtio-mmio: $mmio; MSI-X: $(value tessera.msi "$out"); poweroff -f through ACPI ended tessera with status 0"
	fi
}

scenario_stock_kernel() { check_stock_kernel stock_kernel ""; }

# msi_count NAME IRQ: the count of virtio MSI-X interrupt IRQ (say
# virtio1-req.0) in NAME's tessera.msi line, 0 if it has none.
msi_count() {
	value tessera.msi "/tmp/$1.out" | tr ',' '\n' | sed -n "s/^$2://p" | head -n 1 | grep . || echo 0
}

# --enable-pci with the project's kernel (no ACPI: config space through
# port 0xCF8): the root on a 2-queue vhost-user-blk drive, a data drive
# written with dd, and a 2-pair vhost-user-net interface that pings L1
# and moves 16 MiB each way. Every device must be a virtio-pci function,
# none virtio-mmio, and every queue must interrupt on its own MSI-X vector.
scenario_pci() {
	name=pci
	ip link del tap0 2>/dev/null
	if ! /opt/tessera/bin/ip tuntap add dev tap0 mode tap multi_queue ||
		! ip addr add 10.99.0.1/24 dev tap0 || ! ip link set tap0 up; then
		fail pci "cannot set up tap0 in L1"
		return
	fi
	mkdir -p /tmp/www
	yes TESSERA | head -c 16777216 >/tmp/www/blob
	want_blob=$(md5sum </tmp/www/blob | cut -d' ' -f1)
	httpd -p 8080 -h /tmp/www
	cp "$L2/rootfs.ext4" /tmp/pci-root.ext4
	rm -f /tmp/pci-data.img
	truncate -s 8M /tmp/pci-data.img
	cat >/tmp/pci.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux",
                  "boot_args": "console=ttyS0 reboot=k panic=-1 quiet ip=10.99.0.2::10.99.0.1:255.255.255.0::eth0:off tessera.dd=/dev/vdb:4 tessera.ping=10.99.0.1 tessera.transfer=10.99.0.1 tessera.pci=1 tessera.halt=1"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
  "drives": [
    {"drive_id": "rootfs", "path_on_host": "/tmp/pci-root.ext4", "is_root_device": true, "is_read_only": false},
    {"drive_id": "data", "path_on_host": "/tmp/pci-data.img", "is_root_device": false, "is_read_only": false}
  ],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:63:00:02", "num_queue_pairs": 2}]
}
JSON
	run_tessera pci /tmp/pci.json --no-api --enable-pci </dev/null >/tmp/pci.out 2>/tmp/pci.err
	status=$?
	kill "$(pidof httpd)" 2>/dev/null
	out=/tmp/pci.out
	want_disk=$(yes TESSERA | head -c 4194304 | md5sum | cut -d' ' -f1)
	got_disk=$(head -c 4194304 /tmp/pci-data.img | md5sum | cut -d' ' -f1)
	devices=$(value tessera.pci_devices "$out")
	want_devices="0000:00:00.0=8086:0d57,0000:00:01.0=1af4:1042,0000:00:02.0=1af4:1042,0000:00:03.0=1af4:1041"
	vectors=$(value tessera.msi "$out" | tr ',' '\n' | grep -c .)
	# Each device interrupted on its own vectors (the guest's I/O may have
	# run on either CPU's queue).
	quiet_queues=
	for irqs in "virtio0-req.0 virtio0-req.1" "virtio1-req.0 virtio1-req.1" "virtio2-input.0 virtio2-input.1"; do
		sum=0
		for irq in $irqs; do
			sum=$((sum + $(msi_count pci "$irq")))
		done
		[ "$sum" -gt 0 ] || quiet_queues="$quiet_queues ${irqs%% *}"
	done
	if [ "$status" -ne 0 ] || ! grep -q TESSERA-GUEST-UP "$out"; then
		fail pci "status $status: $(why pci)"
	elif [ "$(value tessera.nproc "$out")" != 2 ]; then
		fail pci "nproc=$(value tessera.nproc "$out"), want 2"
	elif [ "$devices" != "$want_devices" ]; then
		fail pci "PCI functions $devices, want $want_devices"
	elif [ "$(value tessera.virtio_mmio "$out")" != 0 ]; then
		fail pci "$(value tessera.virtio_mmio "$out") virtio-mmio devices besides"
	elif [ "$(value tessera.root_writable "$out")" != yes ]; then
		fail pci "the root on virtio-pci is not writable: $(why pci)"
	elif [ "$got_disk" != "$want_disk" ]; then
		fail pci "the data drive holds the wrong bytes (md5 $got_disk, want $want_disk)"
	elif [ "$(value tessera.ping "$out" | cut -d' ' -f1)" != ok ]; then
		fail pci "L2 -> L1 ping: $(value tessera.ping "$out")"
	elif [ "$(value tessera.fetch "$out")" != "$want_blob" ]; then
		fail pci "16 MiB L1 -> L2: md5 $(value tessera.fetch "$out"), want $want_blob"
	elif [ -n "$quiet_queues" ]; then
		fail pci "no MSI-X interrupts on:$quiet_queues (tessera.msi=$(value tessera.msi "$out"))"
	else
		ok pci "functions $devices, no virtio-mmio; root and dd on virtio-pci blk (4 MiB match), ping and 16 MiB over virtio-pci net; $vectors MSI-X vectors: $(value tessera.msi "$out")"
	fi
}

# The same with --enable-pci.
scenario_stock_kernel_pci() { check_stock_kernel stock_kernel_pci --enable-pci; }

# wait_for NAME PATTERN: waits (60 s at most) until NAME's console has a
# line matching PATTERN.
wait_for() {
	waited=0
	while ! grep -q "$2" "/tmp/$1.out" && [ "$waited" -lt 600 ]; do
		sleep 0.1
		waited=$((waited + 1))
	done
	grep -q "$2" "/tmp/$1.out"
}

# check_hotplug NAME KERNEL INITRD HOW BOOT_ARGS: boots with --enable-pci and
# no drive, PUTs drive "late" once the guest is up, and DELETEs it once the
# guest wrote to it (after the guest removed it itself, with HOW "remove").
# The guest must find the drive as vda (HOW "rescan": it rescans; else the
# ACPI notification brings it), write 1 MiB the host then reads back, and
# see it go.
check_hotplug() {
	name=$1 kernel=$2 initrd=$3 how=$4 args=$5
	rm -f /tmp/$name.img /tmp/$name.sock
	truncate -s 4M /tmp/$name.img
	guest_how=vda
	[ "$how" = rescan ] && guest_how=vda:rescan:remove
	cat >/tmp/$name.json <<JSON
{
  "boot-source": {"kernel_image_path": "$kernel", "initrd_path": "$initrd",
                  "boot_args": "$args tessera.hotplug=$guest_how tessera.halt=1"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 512}
}
JSON
	timeout -s KILL "$SCENARIO_TIMEOUT" tessera --api-sock /tmp/$name.sock --enable-pci \
		--config-file /tmp/$name.json </dev/null >/tmp/$name.out 2>/tmp/$name.err &
	pid=$!
	wait_for "$name" TESSERA-GUEST-UP
	put=$(api-call /tmp/$name.sock PUT /drives/late \
		"{\"drive_id\": \"late\", \"path_on_host\": \"/tmp/$name.img\", \"is_root_device\": false}")
	if [ "$how" = rescan ]; then
		wait_for "$name" "^tessera.hotplug_removed="
	else
		wait_for "$name" "^tessera.hotplug_dd="
	fi
	delete=$(api-call /tmp/$name.sock DELETE /drives/late)
	wait "$pid"
	status=$?
	out=/tmp/$name.out
	want=$(yes TESSERA | head -c 1048576 | md5sum | cut -d' ' -f1)
	got=$(head -c 1048576 /tmp/$name.img | md5sum | cut -d' ' -f1)
	seen=$(value tessera.hotplug_seen "$out")
	if [ "$status" -ne 0 ] || ! grep -q TESSERA-GUEST-UP "$out"; then
		fail "$name" "status $status: $(why "$name")"
	elif [ "${put%% *}" != 204 ]; then
		fail "$name" "PUT /drives/late after boot: $put"
	elif [ "${seen%% *}" != vda ]; then
		fail "$name" "the guest did not find the drive ($how): ${seen:-nothing}: $(grep -i 'pci\|virtio\|vd' "$out" | tail -n 8 | tr -d '\r' | tr '\n' ' ')"
	elif [ "$(value tessera.hotplug_dd "$out")" != ok ] || [ "$got" != "$want" ]; then
		fail "$name" "dd $(value tessera.hotplug_dd "$out"), the host file's md5 $got, want $want"
	elif [ "${delete%% *}" != 204 ]; then
		fail "$name" "DELETE /drives/late: $delete: $(why "$name")"
	elif [ "$(value tessera.hotplug_gone "$out")" != vda ]; then
		fail "$name" "the drive did not leave the guest: $(why "$name")"
	else
		ok "$name" "PUT after boot: $put; the guest found vda at ${seen#* } ($how), wrote 1 MiB (md5 matches on the host); DELETE: $delete; gone from the guest"
	fi
}

# Debian's stock kernel (ACPI): the GED's notification brings the drive
# in, and a DELETE is answered once the guest ejected it (_EJ0).
scenario_hotplug_acpi() {
	check_hotplug hotplug_acpi "$L2/stock-vmlinuz" "$L2/stock-initramfs.cpio.gz" notify \
		"console=ttyS0 reboot=k panic=-1 quiet"
}

# The project's kernel (no ACPI): the guest rescans the bus, and removes
# the device through sysfs before the host's DELETE.
scenario_hotplug_rescan() {
	check_hotplug hotplug_rescan "$L2/vmlinux" "$L2/initramfs.cpio.gz" rescan \
		"console=ttyS0 reboot=k panic=-1 quiet"
}

# Boot-time benchmark: tessera-bench boots Linux 10 times and prints JSON,
# beside Firecracker when build-l1.sh put it in /opt/peers.
# The bench's progress (a line per boot, on stderr) goes to the console, so
# that the host sees L1 is alive and where it stopped if it stops.
scenario_bench() {
	if TESSERA_PEERS_DIR=/opt/peers tessera-bench --linux-guest "$L2" --runs 10 --out /tmp/bench.json >/tmp/bench.log; then
		ok bench "$(tr '\n' ' ' </tmp/bench.json)"
	else
		fail bench "tessera-bench failed; its messages are above"
	fi
}

# Linux's boot on virtio-pci beside virtio-mmio, under tessera and
# Firecracker (each with and without --enable-pci), alternating.
# With --enable-pci Tessera's guest RAM is a memfd (a hot-plugged backend
# maps it), which gets huge pages only where shmem THP allows: the bench
# runs with L1's shmem_enabled at "advise" (README: the host setting), and
# with the L1 kernel's default when NESTED_BENCH_SHMEM=default.
scenario_bench_pci() {
	shmem=/sys/kernel/mm/transparent_hugepage/shmem_enabled
	[ "${NESTED_BENCH_SHMEM:-advise}" = advise ] && echo advise >"$shmem"
	if TESSERA_PEERS_DIR=/opt/peers tessera-bench --linux-pci "$L2" --runs 5 --out /tmp/bench-pci.json >/tmp/bench-pci.log; then
		ok bench_pci "$(tr '\n' ' ' </tmp/bench-pci.json)"
	else
		fail bench_pci "tessera-bench --linux-pci failed; its messages are above"
	fi
}

# CPUID as an L2 sees it, under tessera and (when build-l1.sh put it in
# /opt/peers) under Firecracker: the probe lists every leaf; each line that
# differs is printed as nested.cpuid.diff=<line>.
scenario_cpuid() {
	cat >/tmp/cpuid.json <<JSON
{"boot-source": {"kernel_image_path": "$L2/probe-guest.elf", "boot_args": "console=ttyS0 probe.cpuid"},
 "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
	timeout 60 tessera --no-api --config-file /tmp/cpuid.json 2>/dev/null | grep '^probe.cpuid=' >/tmp/cpuid.tessera
	if [ ! -x /opt/peers/firecracker ]; then
		ok cpuid "$(wc -l </tmp/cpuid.tessera) leaves under tessera; no Firecracker to compare with"
		return
	fi
	timeout 60 /opt/peers/firecracker --no-api --config-file /tmp/cpuid.json 2>/dev/null |
		grep '^probe.cpuid=' >/tmp/cpuid.firecracker
	diff /tmp/cpuid.tessera /tmp/cpuid.firecracker | sed -n 's/^\([<>]\) probe.cpuid=/nested.cpuid.diff=\1 /p'
	ok cpuid "$(wc -l </tmp/cpuid.tessera) leaves under tessera, $(wc -l </tmp/cpuid.firecracker) under Firecracker"
}

# A snapshot of L2 Linux counting into a file on its root drive: the
# guest is paused, snapshotted and its tessera killed; a new tessera loads
# it (the root drive on a copy of the disk taken at the snapshot) and the
# count goes on from the next number.
scenario_snapshot() {
	name=snapshot
	rm -f /tmp/snap.*
	cp "$L2/rootfs.ext4" /tmp/snap-root.ext4
	cat >/tmp/snap.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux",
                  "boot_args": "$BASE_ARGS tessera.count=/count"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
  "drives": [{"drive_id": "rootfs", "path_on_host": "/tmp/snap-root.ext4", "is_root_device": true}]
}
JSON
	timeout -s KILL "$SCENARIO_TIMEOUT" tessera --api-sock /tmp/snap.a.sock \
		--config-file /tmp/snap.json </dev/null >/tmp/snap.a.out 2>/tmp/snap.a.err &
	pid=$!
	waited=0
	until grep -q '^tessera.count=3' /tmp/snap.a.out 2>/dev/null; do
		sleep 1
		waited=$((waited + 1))
		if [ $waited -ge 100 ]; then
			kill -9 $pid 2>/dev/null
			fail snapshot "the guest did not count to 3: $(tail -n 3 /tmp/snap.a.err | tr '\n' ' ')"
			return
		fi
	done
	api-call /tmp/snap.a.sock PATCH /vm '{"state": "Paused"}' >/dev/null &&
		api-call /tmp/snap.a.sock PUT /snapshot/create \
			'{"snapshot_path": "/tmp/snap.state", "mem_file_path": "/tmp/snap.mem"}' >/tmp/snap.create
	created=$?
	cp /tmp/snap-root.ext4 /tmp/snap-clone.ext4
	kill -9 $pid 2>/dev/null
	wait $pid 2>/dev/null
	if [ $created -ne 0 ]; then
		fail snapshot "create: $(cat /tmp/snap.create) $(tail -n 2 /tmp/snap.a.err | tr '\n' ' ')"
		return
	fi
	last=$(sed -n 's/^tessera.count=\([0-9]*\)\r*$/\1/p' /tmp/snap.a.out | tail -n 1)
	timeout -s KILL "$SCENARIO_TIMEOUT" tessera --api-sock /tmp/snap.b.sock \
		</dev/null >/tmp/snap.b.out 2>/tmp/snap.b.err &
	pid=$!
	sleep 1
	if ! api-call /tmp/snap.b.sock PUT /snapshot/load \
		'{"snapshot_path": "/tmp/snap.state", "mem_file_path": "/tmp/snap.mem", "resume_vm": true,
		  "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/tmp/snap-clone.ext4"}]}' >/tmp/snap.load; then
		kill -9 $pid 2>/dev/null
		fail snapshot "load: $(cat /tmp/snap.load) $(tail -n 2 /tmp/snap.b.err | tr '\n' ' ')"
		return
	fi
	want=$((last + 3))
	waited=0
	until grep -q "^tessera.count=$want" /tmp/snap.b.out 2>/dev/null; do
		sleep 1
		waited=$((waited + 1))
		if [ $waited -ge 60 ]; then
			break
		fi
	done
	kill -9 $pid 2>/dev/null
	wait $pid 2>/dev/null
	first=$(sed -n 's/^tessera.count=\([0-9]*\)\r*$/\1/p' /tmp/snap.b.out | head -n 1)
	if [ "${first:-0}" -ne $((last + 1)) ]; then
		fail snapshot "counted to $last before the snapshot, then from ${first:-nothing}: $(tail -n 2 /tmp/snap.b.err | tr '\n' ' ')"
	elif ! grep -q "^tessera.count=$want" /tmp/snap.b.out; then
		fail snapshot "the loaded guest did not count on to $want: $(tail -n 6 /tmp/snap.b.out /tmp/snap.b.err | tr -d '\r' | tr '\n' ' ' | cut -c1-1200)"
	else
		ok snapshot "counted to $last, snapshotted, loaded in a new tessera on a copy of the root disk, counted on from $first to $want"
	fi
}

# A live migration of L2 Linux counting into a file on its root drive:
# the guest moves from one tessera to a fresh one over a Unix socket (the
# root drive stays where it is, as on shared storage), the source exits 0,
# and the guest counts on at the destination with no number lost.
scenario_migration() {
	name=migration
	rm -f /tmp/mig.*
	cp "$L2/rootfs.ext4" /tmp/mig-root.ext4
	cat >/tmp/mig.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux",
                  "boot_args": "$BASE_ARGS tessera.count=/count"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true},
  "drives": [{"drive_id": "rootfs", "path_on_host": "/tmp/mig-root.ext4", "is_root_device": true}]
}
JSON
	timeout -s KILL "$SCENARIO_TIMEOUT" tessera --api-sock /tmp/mig.a.sock \
		--config-file /tmp/mig.json </dev/null >/tmp/mig.a.out 2>/tmp/mig.a.err &
	src=$!
	waited=0
	until grep -q '^tessera.count=3' /tmp/mig.a.out 2>/dev/null; do
		sleep 1
		waited=$((waited + 1))
		if [ $waited -ge 100 ]; then
			kill -9 $src 2>/dev/null
			fail migration "the guest did not count to 3: $(tail -n 3 /tmp/mig.a.err | tr '\n' ' ') console: $(tail -n 8 /tmp/mig.a.out | tr '\n\r' '  ')"
			return
		fi
	done
	timeout -s KILL "$SCENARIO_TIMEOUT" tessera --api-sock /tmp/mig.b.sock \
		</dev/null >/tmp/mig.b.out 2>/tmp/mig.b.err &
	dst=$!
	sleep 1
	api-call /tmp/mig.b.sock PUT /migration/receive '{"listen": "unix:/tmp/mig.stream"}' >/tmp/mig.receive &
	receiving=$!
	waited=0
	until [ -S /tmp/mig.stream ] || [ $waited -ge 10 ]; do
		sleep 1
		waited=$((waited + 1))
	done
	if ! api-call /tmp/mig.a.sock PUT /migration/send '{"destination": "unix:/tmp/mig.stream"}' >/tmp/mig.send; then
		sleep 2
		kill -9 $src $dst 2>/dev/null
		wait $src
		status=$?
		fail migration "send: $(cat /tmp/mig.send); source exited $status: $(grep -v '^vhost-user' /tmp/mig.a.err | tail -n 3 | tr '\n' ' ') destination: $(tail -n 2 /tmp/mig.b.err | tr '\n' ' ') $(dmesg | grep -i 'audit\|seccomp' | tail -n 2 | tr '\n' ' ')"
		return
	fi
	wait $src
	status=$?
	wait $receiving
	received=$?
	last=$(sed -n 's/^tessera.count=\([0-9]*\)\r*$/\1/p' /tmp/mig.a.out | tail -n 1)
	want=$((last + 3))
	waited=0
	until grep -q "^tessera.count=$want" /tmp/mig.b.out 2>/dev/null; do
		sleep 1
		waited=$((waited + 1))
		if [ $waited -ge 60 ]; then
			break
		fi
	done
	kill -9 $dst 2>/dev/null
	wait $dst 2>/dev/null
	first=$(sed -n 's/^tessera.count=\([0-9]*\)\r*$/\1/p' /tmp/mig.b.out | head -n 1)
	downtime=$(sed -n 's/.*migration done: \(.*\)$/\1/p' /tmp/mig.a.err | tail -n 1)
	if [ $status -ne 0 ] || [ $received -ne 0 ]; then
		fail migration "source exited $status, receive exited $received: $(cat /tmp/mig.receive) $(tail -n 2 /tmp/mig.a.err | tr '\n' ' ')"
	elif [ "${first:-0}" -ne $((last + 1)) ]; then
		fail migration "counted to $last at the source, then from ${first:-nothing}: $(tail -n 2 /tmp/mig.b.err | tr '\n' ' ')"
	elif ! grep -q "^tessera.count=$want" /tmp/mig.b.out; then
		fail migration "the moved guest did not count on to $want: $(tail -n 2 /tmp/mig.b.out | tr '\n' ' ')"
	else
		ok migration "counted to $last, moved to a new tessera ($downtime), counted on from $first to $want; the source exited 0"
	fi
}

# tessera-bench --migration inside L1 (128 MiB cells only: L1 has 2 GiB),
# Cloud Hypervisor beside tessera when /opt/peers has it; used by
# `tessera-bench --nested-migration`.
scenario_migration_bench() {
	ip link set lo up
	if TESSERA_PEERS_DIR=/opt/peers TESSERA_GUEST_DIR=$L2 TESSERA_BENCH_MIGRATION_SIZES=128 \
		tessera-bench --migration --runs 3 --out /tmp/migbench.json >/tmp/migbench.log 2>&1; then
		ok migration_bench "$(tr '\n' ' ' </tmp/migbench.json)"
	else
		fail migration_bench "$(tail -n 3 /tmp/migbench.log | tr '\n' ' ')"
	fi
}

# MMDS V2 on an interface of an L2 Linux: the guest gets a session token
# (PUT over busybox nc) and reads the metadata with busybox wget; nothing it
# sends to 169.254.169.254 reaches the TAP.
scenario_mmds() {
	name=mmds
	ip link del tap1 2>/dev/null
	if ! /opt/tessera/bin/ip tuntap add dev tap1 mode tap || ! ip addr add 10.98.0.1/24 dev tap1 ||
		! ip link set tap1 up; then
		fail mmds "cannot set up tap1 in L1"
		return
	fi
	echo '{"latest": {"meta-data": {"ami-id": "ami-12345", "hostname": "tessera-l2"}}}' >/tmp/mmds.data
	cat >/tmp/mmds.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux", "initrd_path": "$L2/initramfs.cpio.gz",
                  "boot_args": "$BASE_ARGS ip=10.98.0.2::10.98.0.1:255.255.255.0::eth0:off tessera.mmds=/latest/meta-data/ tessera.halt=1"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap1", "guest_mac": "06:00:0a:62:00:02"}],
  "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]}
}
JSON
	tap_rx_before=$(cat /sys/class/net/tap1/statistics/rx_packets)
	run_tessera mmds /tmp/mmds.json --no-api --metadata /tmp/mmds.data </dev/null >/tmp/mmds.out 2>/tmp/mmds.err
	status=$?
	tap_rx=$(($(cat /sys/class/net/tap1/statistics/rx_packets) - tap_rx_before))
	token=$(value tessera.mmds_token /tmp/mmds.out)
	body=$(value tessera.mmds /tmp/mmds.out)
	if [ "$status" -ne 0 ] || ! grep -q TESSERA-GUEST-UP /tmp/mmds.out; then
		fail mmds "status $status: $(why mmds)"
	elif [ "$token" != 48 ]; then
		fail mmds "the guest's token is ${token:-missing} characters, want 48: $(why mmds)"
	elif [ "$body" != "ami-id|hostname" ]; then
		fail mmds "the guest read '$body', want 'ami-id|hostname': $(why mmds)"
	elif [ "$tap_rx" -ne 0 ]; then
		fail mmds "$tap_rx frames reached tap1"
	else
		ok mmds "V2: a 48-character token over nc, then wget /latest/meta-data/ = $body; no frame reached the TAP"
	fi
	ip link del tap1 2>/dev/null
}

# The balloon with a Linux driver: PATCH /balloon to 64 MiB takes 64 MiB
# out of the guest's MemTotal, and the statistics show it; the guest
# reports free pages (free page reporting), which the VMM gives back.
scenario_balloon() {
	name=balloon
	rm -f /tmp/balloon.*
	cat >/tmp/balloon.json <<JSON
{
  "boot-source": {"kernel_image_path": "$L2/vmlinux", "initrd_path": "$L2/initramfs.cpio.gz",
                  "boot_args": "$BASE_ARGS tessera.memtotal_after=20 tessera.halt=1"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
  "balloon": {"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1,
              "free_page_reporting": true},
  "metrics": {"metrics_path": "/tmp/balloon.metrics"}
}
JSON
	timeout -s KILL "$SCENARIO_TIMEOUT" tessera --api-sock /tmp/balloon.sock \
		--config-file /tmp/balloon.json </dev/null >/tmp/balloon.out 2>/tmp/balloon.err &
	vm=$!
	waited=0
	until grep -q '^TESSERA-GUEST-UP' /tmp/balloon.out 2>/dev/null || [ $waited -ge 60 ]; do
		sleep 1
		waited=$((waited + 1))
	done
	api-call /tmp/balloon.sock PATCH /balloon '{"amount_mib": 64}' >/tmp/balloon.patch
	sleep 10
	api-call /tmp/balloon.sock GET /balloon/statistics >/tmp/balloon.stats
	api-call /tmp/balloon.sock PUT /actions '{"action_type": "FlushMetrics"}' >/dev/null
	wait $vm
	status=$?
	before=$(value tessera.memtotal_kb /tmp/balloon.out)
	after=$(value tessera.memtotal_after_kb /tmp/balloon.out)
	taken=$(( ${before:-0} - ${after:-0} ))
	actual=$(sed -n 's/.*"actual_mib": *\([0-9]*\).*/\1/p' /tmp/balloon.stats)
	# Each flush reports what happened since the last: add them up.
	reports=$(sed -n 's/.*"free_page_report_count": *\([0-9]*\).*/\1/p' /tmp/balloon.metrics |
		awk '{ n += $1 } END { print n + 0 }')
	if [ "$status" -ne 0 ] || ! grep -q TESSERA-GUEST-UP /tmp/balloon.out; then
		fail balloon "status $status: $(why balloon)"
	elif [ "$taken" -lt 62259 ] || [ "$taken" -gt 68813 ]; then
		fail balloon "MemTotal went from $before to $after kB ($taken kB), want 65536 within 5%: $(cat /tmp/balloon.patch) $(why balloon)"
	elif [ "$actual" != 64 ]; then
		fail balloon "the statistics say actual_mib=${actual:-none}: $(cat /tmp/balloon.stats)"
	elif [ "${reports:-0}" -lt 1 ]; then
		fail balloon "no free page reports: $(head -c 300 /tmp/balloon.metrics)"
	else
		ok balloon "PATCH to 64 MiB: MemTotal $before -> $after kB ($taken kB), actual_mib=$actual; $reports free page reports"
	fi
}

# Nested page faults (KVM's kvm_page_fault tracepoint in L1) while L2
# Linux boots to init and halts, under tessera and under Firecracker: how
# many, on how many 2 MiB guest regions, the regions that took more than
# one fault (mapped 4 KiB at a time), L1's THP fault counters, and the
# L2 exits by reason.
# Mounts tracefs at $trace if need be; false (scenario $1 failed) without.
tracefs_for() {
	trace=/sys/kernel/tracing
	[ -e $trace/trace ] || mount -t tracefs tracefs $trace || {
		fail "$1" "no tracefs"
		return 1
	}
}

# A configuration (file $1) that both VMMs read: L2 boots to init, which
# halts at once.
halting_boot_json() {
	cat >"$1" <<JSON
{"boot-source": {"kernel_image_path": "$L2/vmlinux", "initrd_path": "$L2/initramfs.cpio.gz",
  "boot_args": "console=ttyS0 reboot=k panic=-1 pci=off quiet tessera.halt=1"},
 "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}}
JSON
}

scenario_npf() {
	tracefs_for npf || return
	halting_boot_json /tmp/npf.json
	echo 8192 >$trace/buffer_size_kb
	for vmm in tessera /opt/peers/firecracker tessera /opt/peers/firecracker; do
		[ -x "$(command -v $vmm)" ] || continue
		name=$(basename $vmm)
		echo 0 >$trace/tracing_on
		echo >$trace/trace
		echo 1 >$trace/events/kvm/kvm_page_fault/enable
		echo 1 >$trace/events/kvm/kvm_exit/enable
		before=$(awk '/^thp_fault_(alloc|fallback) / { printf "%s ", $2 }' /proc/vmstat)
		start=$(awk '{ print int($1 * 1000) }' /proc/uptime)
		echo 1 >$trace/tracing_on
		timeout 60 $vmm --no-api --config-file /tmp/npf.json >/tmp/npf.out 2>&1
		echo 0 >$trace/tracing_on
		ms=$(($(awk '{ print int($1 * 1000) }' /proc/uptime) - start))
		after=$(awk '/^thp_fault_(alloc|fallback) / { printf "%s ", $2 }' /proc/vmstat)
		echo "nested.npf.$name=$ms ms, thp_fault alloc/fallback before $before after $after"
		grep kvm_page_fault $trace/trace | sed -n 's/.*address \(0x[0-9a-f]*\).*/\1/p' |
			awk '{ r = int(($1 + 0) / 2097152); n[r]++; total++ }
			END { for (r in n) { regions++; if (n[r] > 1) { many++; printf "%d:%d ", r * 2, n[r] } }
			      printf "\n%d faults, %d regions, %d with several\n", total, regions, many }' >/tmp/npf.sum
		echo "nested.npf.$name.regions=$(head -n 1 /tmp/npf.sum)"
		echo "nested.npf.$name.total=$(tail -n 1 /tmp/npf.sum)"
		echo "nested.npf.$name.exits=$(grep kvm_exit: $trace/trace | sed -n 's/.*reason \([A-Za-z_0-9]*\).*/\1/p' |
			sort | uniq -c | sort -rn | awk '{ printf "%s:%s ", $2, $1 }')"
	done
	echo 0 >$trace/events/kvm/kvm_page_fault/enable
	echo 0 >$trace/events/kvm/kvm_exit/enable
	ok npf "see the nested.npf.* lines"
}

# Where each VMM's start-up goes in L1, before its guest runs: one boot
# under each with the VMM's syscalls, its user page faults and KVM's first
# guest entry traced, printed as nested.startup.<vmm>.<n>=<ms> <event>
# (milliseconds from exec; each line counts the page faults since the
# one before).
scenario_startup() {
	tracefs_for startup || return
	halting_boot_json /tmp/startup.json
	echo 16384 >$trace/buffer_size_kb
	events="syscalls/sys_enter_execve syscalls/sys_enter_ioctl syscalls/sys_exit_ioctl
		syscalls/sys_enter_read syscalls/sys_exit_read syscalls/sys_enter_mmap
		syscalls/sys_enter_openat syscalls/sys_enter_clone3 syscalls/sys_enter_seccomp
		syscalls/sys_enter_madvise exceptions/page_fault_user kvm/kvm_entry
		sched/sched_process_exec"
	for vmm in tessera /opt/peers/firecracker tessera /opt/peers/firecracker; do
		[ -x "$(command -v $vmm)" ] || continue
		name=$(basename $vmm)
		echo 0 >$trace/tracing_on
		echo >$trace/trace
		for e in $events; do echo 1 >$trace/events/$e/enable; done
		echo 1 >$trace/tracing_on
		timeout 60 $vmm --no-api --config-file /tmp/startup.json >/tmp/startup.out 2>&1
		echo 0 >$trace/tracing_on
		for e in $events; do echo 0 >$trace/events/$e/enable; done
		# The VMM's own lines (its threads share its pid's comm or are
		# named after it); from its execve to KVM's first guest entry.
		awk -v vmm="$name" '
			!started && /sched_process_exec/ && index($0, "/" vmm " ") { started = 1 }
			!started { next }
			{ task = $1; sub(/-[0-9]+$/, "", task) }
			task != vmm && task !~ /^fc_/ { next }
			{ match($0, /[0-9]+\.[0-9]+:/); t = substr($0, RSTART, RLENGTH - 1) * 1000 }
			!t0 { t0 = t }
			/page_fault_user/ { pf++; next }
			/kvm_entry/ { printf "nested.startup.%s.%d=%.1f first guest entry, %d page faults before\n", vmm, ++n, t - t0, pf; exit }
			{ sub(/^.*: sys_/, "sys_"); printf "nested.startup.%s.%d=%.1f pf+%d %s\n", vmm, ++n, t - t0, pf - last, substr($0, 1, 90); last = pf }
		' $trace/trace | head -n 400
	done
	ok startup "see the nested.startup.* lines"
}

scenarios=$(sed -n 's/.*nested\.scenarios=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
for scenario in $scenarios; do
	case "$scenario" in
	initramfs | bzimage | reboot | poweroff | boot_timer | ctrl_alt_del | blk_root | blk_readonly | net | vsock | stock_kernel | bench | bench_pci | cpuid | npf | startup | snapshot | migration | migration_bench | mmds | balloon | pci | stock_kernel_pci | hotplug_acpi | hotplug_rescan | jailed_initramfs | jailed_blk_root | jailed_net)
		"scenario_$scenario" ;;
	*) fail "$scenario" "unknown scenario" ;;
	esac
done
finish
