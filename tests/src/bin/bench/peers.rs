//! The peer VMMs measured beside Tessera: Firecracker and Cloud Hypervisor
//! release builds from `$TESSERA_PEERS_DIR` (default `../shared/peers`
//! beside the repository). They are optional: a bench without them
//! measures Tessera alone and says which peer was missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_tests::{repo_root, VmConfig};

/// The directory the peer binaries are taken from.
pub(crate) fn peers_dir() -> PathBuf {
    std::env::var_os("TESSERA_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/peers"))
}

/// The peer binary `name`, if it is there.
pub(crate) fn peer_bin(name: &str) -> Option<PathBuf> {
    let path = peers_dir().join(name);
    path.is_file().then_some(path)
}

/// A VMM that boots the probe guest without an API socket.
#[derive(Clone, Debug)]
pub(crate) enum Vmm {
    Tessera,
    Firecracker(PathBuf),
    CloudHypervisor(PathBuf),
}

impl Vmm {
    /// Tessera and every peer VMM present, and a note per missing one.
    pub(crate) fn all() -> (Vec<Vmm>, Vec<String>) {
        let mut vmms = vec![Vmm::Tessera];
        let mut missing = Vec::new();
        for (name, make) in [
            ("firecracker", Vmm::Firecracker as fn(PathBuf) -> Vmm),
            ("cloud-hypervisor", Vmm::CloudHypervisor),
        ] {
            match peer_bin(name) {
                Some(path) => vmms.push(make(path)),
                None => missing.push(format!(
                    "{name} not measured: no {}",
                    peers_dir().join(name).display()
                )),
            }
        }
        (vmms, missing)
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Vmm::Tessera => "tessera",
            Vmm::Firecracker(_) => "firecracker",
            Vmm::CloudHypervisor(_) => "cloud-hypervisor",
        }
    }

    /// Boots `config` at once, the guest console on stdout. Firecracker
    /// and Tessera read the same Firecracker JSON file (in `dir`).
    pub(crate) fn boot_command(&self, config: &VmConfig, dir: &Path) -> Command {
        self.boot_command_with_vsock(config, dir, None)
    }

    /// [`Vmm::boot_command`] with a vsock device (guest CID 3) whose
    /// hybrid host socket is `vsock_uds`: each VMM's own way to say it.
    pub(crate) fn boot_command_with_vsock(
        &self,
        config: &VmConfig,
        dir: &Path,
        vsock_uds: Option<&Path>,
    ) -> Command {
        let vsock = vsock_uds.map(|uds| serde_json::json!({"guest_cid": 3, "uds_path": uds}));
        match self {
            Vmm::Tessera => {
                let mut json = config.to_json();
                if let Some(vsock) = vsock {
                    json["vsock"] = vsock;
                }
                let path = dir.join("tessera-config.json");
                std::fs::write(&path, json.to_string()).expect("write config");
                let mut command = Command::new(tessera_tests::workspace_bin("tessera"));
                command.arg("--no-api").arg("--config-file").arg(path);
                command
            }
            Vmm::Firecracker(bin) => {
                let mut json = config.to_json();
                json["drives"] = serde_json::json!([]);
                if let Some(vsock) = vsock {
                    json["vsock"] = vsock;
                }
                let path = dir.join("firecracker-config.json");
                std::fs::write(&path, json.to_string()).expect("write config");
                let mut command = Command::new(bin);
                command.arg("--no-api").arg("--config-file").arg(path);
                command
            }
            Vmm::CloudHypervisor(bin) => {
                let mut command = Command::new(bin);
                command
                    .arg("--kernel")
                    .arg(&config.kernel)
                    .args(["--cmdline", &config.boot_args])
                    .args(["--memory", &format!("size={}M", config.mem_size_mib)])
                    .args(["--cpus", &format!("boot={}", config.vcpu_count)])
                    .args(["--serial", "tty", "--console", "off"]);
                if let Some(initrd) = &config.initrd {
                    command.arg("--initramfs").arg(initrd);
                }
                if let Some(uds) = vsock_uds {
                    command
                        .arg("--vsock")
                        .arg(format!("cid=3,socket={}", uds.display()));
                }
                command
            }
        }
    }

    /// Boots the Firecracker JSON `config` (Tessera or Firecracker, written
    /// in `dir`) without an API socket, waits for the guest's first whole
    /// console line starting with `prefix`, ends the VMM, and returns that
    /// line (less the prefix) and the whole console.
    pub(crate) fn console_line(
        &self,
        config: &serde_json::Value,
        dir: &Path,
        prefix: &str,
        deadline: std::time::Duration,
    ) -> (String, String) {
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).expect("write config");
        let bin = match self {
            Vmm::Tessera => tessera_tests::workspace_bin("tessera"),
            Vmm::Firecracker(bin) | Vmm::CloudHypervisor(bin) => bin.clone(),
        };
        let mut command = Command::new(bin);
        command.arg("--no-api").arg("--config-file").arg(&path);
        let mut vm = tessera_tests::Running::spawn(command);
        let line = |out: &str| {
            tessera_tests::console::whole_lines(out)
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::to_string)
        };
        vm.wait_until(deadline, |out, _| line(out).is_some());
        let out = vm.stdout();
        let found = line(&out).unwrap_or_else(|| {
            panic!("{}: no {prefix} line:\n{out}\n{}", self.name(), vm.stderr())
        });
        drop(vm.finish());
        (found, out)
    }

    /// Starts the VMM with only its API socket at `socket`.
    pub(crate) fn api_command(&self, socket: &Path) -> Command {
        let mut command = match self {
            Vmm::Tessera => Command::new(tessera_tests::workspace_bin("tessera")),
            Vmm::Firecracker(bin) | Vmm::CloudHypervisor(bin) => Command::new(bin),
        };
        match self {
            Vmm::CloudHypervisor(_) => command
                .arg("--api-socket")
                .arg(format!("path={}", socket.display())),
            _ => command.arg("--api-sock").arg(socket),
        };
        command
    }

    /// The request that shows the API is up.
    pub(crate) fn ping_path(&self) -> &'static str {
        match self {
            Vmm::CloudHypervisor(_) => "/api/v1/vmm.ping",
            _ => "/",
        }
    }

    /// Whether thread `comm` of this VMM runs a vCPU.
    pub(crate) fn is_vcpu_thread(&self, comm: &str) -> bool {
        match self {
            Vmm::CloudHypervisor(_) => comm.starts_with("vcpu"),
            _ => comm.starts_with("fc_vcpu"),
        }
    }
}
