//! Fleets of jailed probe guests, for the soak test and the fleet bench:
//! each microVM has a 4 MiB drive and an interface on a TAP of its own,
//! laid out in its jail as an orchestrator would lay it out, for Tessera's
//! jailer or Firecracker's (the same files; only the exec file differs).

use std::path::{Path, PathBuf};

use crate::guest_artifacts;
use crate::jail::JailBase;

/// The uid and gid a fleet's VMMs run as (the TAPs belong to it).
pub const VMM_UID: u32 = 1234;
/// The uid and gid of Tessera's jailed backends.
pub const BACKEND_UID: u32 = 1235;

/// The guest of fleet VM `index`: the probe writes and checks 1 MiB of its
/// drive, brings up its interface at `<prefix>.<index>.2/24` and ticks.
pub fn probe_args(index: usize, prefix: &str) -> String {
    crate::probe_cmdline(&format!(
        "probe.blk=write probe.blk_mib=1 probe.seed={index} probe.net={prefix}.{index}.2/24 \
         probe.ticks=0"
    ))
}

/// Creates the jail root of `exe` instance `id` (`<base>/<exe>/<id>/root`)
/// with the probe as `kernel`, `data.img` (owned by [`VMM_UID`]) and
/// `vm.json`, which boots the probe with `boot_args`, the drive and `eth0`
/// on `tap` with MAC `mac`. Paths in it are relative to the jail.
pub fn prepare_vm(
    base: &JailBase,
    exe: &str,
    id: &str,
    boot_args: &str,
    tap: &str,
    mac: &str,
) -> PathBuf {
    let root = base.root(exe, id);
    std::fs::create_dir_all(&root).expect("jail root");
    std::fs::copy(guest_artifacts().probe(), root.join("kernel")).expect("copy the probe");
    let disk = root.join("data.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 20))
        .expect("create the drive");
    std::os::unix::fs::chown(&disk, Some(VMM_UID), Some(VMM_UID)).expect("chown the drive");
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": "kernel", "boot_args": boot_args },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "drives": [{"drive_id": "data", "path_on_host": "data.img",
                    "is_root_device": false, "is_read_only": false}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac}],
    });
    std::fs::write(root.join("vm.json"), config.to_string()).expect("write vm.json");
    root
}

/// The MAC of fleet VM `index`.
pub fn mac(index: usize) -> String {
    format!("06:00:0a:52:{:02x}:{:02x}", index / 256, index % 256)
}

/// The jailer arguments for instance `id` of `exec_file` in `base`, in
/// network namespace `netns`, with `extra` jailer flags, running
/// `--no-api --config-file vm.json` (Tessera's jailer and Firecracker's
/// take the same ones).
pub fn jailer_args(
    base: &Path,
    id: &str,
    exec_file: &Path,
    netns: &str,
    extra: &[&str],
) -> Vec<String> {
    let uid = VMM_UID.to_string();
    let mut args: Vec<String> = [
        "--id",
        id,
        "--exec-file",
        exec_file.to_str().expect("utf-8 path"),
        "--uid",
        &uid,
        "--gid",
        &uid,
        "--chroot-base-dir",
        base.to_str().expect("utf-8 path"),
        "--netns",
        netns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--", "--no-api", "--config-file", "vm.json"].map(String::from));
    args
}
