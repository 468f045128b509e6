//! Helpers for the jailer tests: a throw-away chroot base, a jail root
//! prepared with the probe kernel and a config whose paths are relative to
//! it (as with Firecracker's jailer), the `jailer` command, and what
//! `/proc` and cgroupfs say about a jailed process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{guest_artifacts, workspace_bin};

/// A unique chroot base under /tmp, removed on drop.
pub struct JailBase {
    dir: tempfile::TempDir,
}

impl JailBase {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-jail-")
            .tempdir_in("/tmp")
            .expect("chroot base");
        // Traversable, as /srv/jailer is: what the jailed uids cannot do
        // there is then down to the jail's own modes.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chroot base mode");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<base>/<exe>/<id>/root`.
    pub fn root(&self, exe: &str, id: &str) -> PathBuf {
        self.path().join(exe).join(id).join("root")
    }

    /// The jail root of the `exe` backend of `device` of `tessera`
    /// instance `id`: `<base>/tessera/<id>/<exe>/<device>/root`.
    pub fn backend_root(&self, id: &str, exe: &str, device: &str) -> PathBuf {
        self.path()
            .join("tessera")
            .join(id)
            .join(exe)
            .join(device)
            .join("root")
    }

    /// Creates the jail root of `tessera` instance `id` with the probe
    /// kernel (`kernel`) and `vm.json` booting it with `boot_args`.
    pub fn prepare_probe(&self, id: &str, boot_args: &str) -> PathBuf {
        let root = self.root("tessera", id);
        std::fs::create_dir_all(&root).expect("jail root");
        std::fs::copy(guest_artifacts().probe(), root.join("kernel")).expect("copy the probe");
        let config = serde_json::json!({
            "boot-source": { "kernel_image_path": "kernel", "boot_args": boot_args },
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        });
        std::fs::write(root.join("vm.json"), config.to_string()).expect("write vm.json");
        root
    }
}

impl Default for JailBase {
    fn default() -> Self {
        Self::new()
    }
}

/// An instance id no other test (or test run) uses.
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `jailer` with `args`.
pub fn jailer_command(args: &[&str]) -> Command {
    let mut command = Command::new(workspace_bin("jailer"));
    command.args(args);
    command
}

/// A field of `/proc/<pid>/status`, whitespace-normalized ("Uid" gives
/// "1234 1234 1234 1234").
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == field).then(|| value.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

/// Where a cgroup v1 controller is mounted.
pub fn v1_mount(controller: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 3 && fields[2] == "cgroup" && fields[3].split(',').any(|o| o == controller))
            .then(|| PathBuf::from(fields[1]))
    })
}

/// `<mount of controller>/<parent>/<leaf>`.
pub fn cgroup_dir(controller: &str, parent: &str, leaf: &str) -> PathBuf {
    v1_mount(controller)
        .unwrap_or_else(|| panic!("cgroup v1 controller {controller} is not mounted"))
        .join(parent)
        .join(leaf)
}

/// Waits until none of `paths` exists; true if they all went in time.
pub fn wait_gone(paths: &[PathBuf], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if paths.iter().all(|p| !p.exists()) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes a test's parent cgroup in each controller (empty by then).
pub fn remove_parent_cgroups(controllers: &[&str], parent: &str) {
    for controller in controllers {
        if let Some(mount) = v1_mount(controller) {
            let _ = std::fs::remove_dir(mount.join(parent));
        }
    }
}
