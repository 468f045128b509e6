//! The VM's configuration, in Firecracker's `--config-file` JSON schema.
//!
//! The resource types (one file each) live in the `vmm-config` crate, shared
//! with the REST API; [`VmResources`] holds them until the VM is built, and
//! every change, from a file or from the API, goes through its methods.

mod host;
mod net;
mod vsock;

pub use vsock::{VsockResource, VsockSocketError};

use std::path::Path;

use serde::{Deserialize, Serialize};
use tessera_rate_limiter::RateLimiterConfig;

use vmm_config::{
    BalloonDeviceConfig, BalloonError, BlockDeviceUpdate, BootSourceError, DriveError,
    EntropyDeviceConfig, MachineConfigError, MmdsConfig, MmdsConfigError, NetError,
    NetworkInterfaceUpdate, VsockDeviceConfig, VsockError,
};
pub use vmm_config::{
    BlockDeviceConfig, BootSourceConfig, HugePageConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, NetworkInterfaceConfig, SerialConfig,
    DEFAULT_KERNEL_CMDLINE, MAX_SUPPORTED_VCPUS, MIN_MEM_SIZE_MIB,
};

/// Errors in a configuration file or resource.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the configuration has no \"boot-source\"")]
    MissingBootSource,
    #[error(transparent)]
    BootSource(#[from] BootSourceError),
    #[error(transparent)]
    MachineConfig(#[from] MachineConfigError),
    #[error(transparent)]
    Drive(#[from] DriveError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("\"{0}\" is not supported by Tessera yet")]
    NotSupported(&'static str),
    #[error("no drive with id {0:?} is configured")]
    UnknownDrive(String),
    #[error("no network interface with id {0:?} is configured")]
    UnknownInterface(String),
    #[error("rate limiters are not supported by Tessera yet ({0})")]
    RateLimiter(String),
    #[error(transparent)]
    Tap(#[from] net::TapCheckError),
    #[error(transparent)]
    Host(#[from] host::HostLimitError),
    #[error("interface {id:?}: host_dev_name {name:?} is already used by interface {other:?}")]
    SharedTap {
        id: String,
        name: String,
        other: String,
    },
    #[error(transparent)]
    Serial(#[from] vmm_config::SerialError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    VsockSocket(#[from] VsockSocketError),
    #[error("drive {id:?}: path_on_host {path} cannot be set: the drive is served by the backend at socket {socket}, which owns its file")]
    SocketDrivePath {
        id: String,
        path: String,
        socket: String,
    },
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// Firecracker's text.
    #[error(
        "The memory size (MiB) is smaller than the previously set balloon device target size."
    )]
    BalloonLargerThanMemory,
    #[error("the balloon gives back 4 KiB pages: it cannot be used with huge_pages")]
    BalloonHugePages,
    /// Firecracker's prefix (its API answer has a third M, see the API).
    #[error("MMDS config error: {0}")]
    MmdsConfig(#[from] MmdsConfigError),
}

/// The top level of Firecracker's configuration file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    #[serde(rename = "boot-source")]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config")]
    pub machine_config: Option<MachineConfig>,
    #[serde(default)]
    pub drives: Vec<BlockDeviceConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDeviceConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDeviceConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonDeviceConfig>,
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    // Sections of Firecracker's schema that Tessera parses but cannot honour
    // yet. They are rejected by name rather than as unknown fields.
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub pmem: Option<serde_json::Value>,
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmResources {
    pub boot_source: Option<BootSourceConfig>,
    pub machine_config: MachineConfig,
    pub drives: Vec<BlockDeviceConfig>,
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
    pub serial: Option<SerialConfig>,
    pub vsock: Option<VsockResource>,
    pub entropy: Option<EntropyDeviceConfig>,
    pub balloon: Option<BalloonDeviceConfig>,
    /// The metadata store (not part of a snapshot, as in Firecracker).
    pub mmds: vmm_config::MmdsStore,
    /// Which interfaces serve the store to the guest, and how.
    pub mmds_config: Option<MmdsConfig>,
}

impl VmResources {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ResourcesError> {
        let text = std::fs::read_to_string(path).map_err(|source| ResourcesError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates configuration JSON.
    pub fn from_json(json: &str) -> Result<Self, ResourcesError> {
        Self::from_config(serde_json::from_str(json)?, true)
    }

    /// The configuration a snapshot recorded: validated as a file's, but
    /// its boot source is history (the kernel need not be on this host, as
    /// with Firecracker), kept for `GET /vm/config` and not checked.
    pub fn from_snapshot_json(json: &str) -> Result<Self, ResourcesError> {
        Self::from_config(serde_json::from_str(json)?, false)
    }

    fn from_config(file: VmConfigFile, check_boot_source: bool) -> Result<Self, ResourcesError> {
        let unsupported = [
            ("cpu-config", file.cpu_config.is_some()),
            ("pmem", file.pmem.is_some()),
            ("memory-hotplug", file.memory_hotplug.is_some()),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, present)| *present) {
            return Err(ResourcesError::NotSupported(name));
        }

        let mut resources = VmResources {
            logger: file.logger,
            metrics: file.metrics,
            ..Default::default()
        };
        if let Some(serial) = file.serial {
            resources.set_serial(serial)?;
        }
        if check_boot_source {
            let boot_source = file.boot_source.ok_or(ResourcesError::MissingBootSource)?;
            resources.set_boot_source(boot_source)?;
        } else {
            resources.boot_source = file.boot_source;
        }
        if let Some(machine_config) = file.machine_config {
            resources.set_machine_config(machine_config)?;
        }
        for drive in file.drives {
            resources.insert_drive(drive)?;
        }
        for iface in file.network_interfaces {
            resources.insert_network_interface(iface)?;
        }
        if let Some(vsock) = file.vsock {
            resources.set_vsock(vsock)?;
        }
        resources.entropy = file.entropy;
        if let Some(balloon) = file.balloon {
            resources.set_balloon(balloon)?;
        }
        if let Some(config) = file.mmds_config {
            resources.set_mmds_config(config)?;
        }
        Ok(resources)
    }

    /// Sets the boot source after checking its files.
    pub fn set_boot_source(&mut self, boot_source: BootSourceConfig) -> Result<(), ResourcesError> {
        boot_source.validate()?;
        self.boot_source = Some(boot_source);
        Ok(())
    }

    /// Sets where the guest console goes.
    pub fn set_serial(&mut self, serial: SerialConfig) -> Result<(), ResourcesError> {
        serial.validate()?;
        if serial.rate_limiter.as_ref().is_some_and(limits_anything) {
            return Err(ResourcesError::RateLimiter("serial".into()));
        }
        self.serial = Some(serial);
        Ok(())
    }

    /// Sets (or replaces) the vsock device, binding its host socket.
    pub fn set_vsock(&mut self, config: VsockDeviceConfig) -> Result<(), ResourcesError> {
        config.validate()?;
        self.vsock = Some(VsockResource::bind(config, self.vsock.as_ref())?);
        Ok(())
    }

    /// Replaces the machine configuration.
    pub fn set_machine_config(&mut self, config: MachineConfig) -> Result<(), ResourcesError> {
        config.validate()?;
        host::check_machine_config(&config)?;
        self.check_balloon_fits(&config)?;
        self.machine_config = config;
        Ok(())
    }

    /// Sets (or replaces) the balloon device: its target must fit in guest
    /// memory, and huge pages cannot be given back a 4 KiB page at a time.
    pub fn set_balloon(&mut self, config: BalloonDeviceConfig) -> Result<(), ResourcesError> {
        config.target_pages(self.machine_config.mem_size_mib)?;
        if self.machine_config.huge_pages != HugePageConfig::None {
            return Err(ResourcesError::BalloonHugePages);
        }
        self.balloon = Some(config);
        Ok(())
    }

    /// Guest memory stays at least as large as the balloon's target.
    fn check_balloon_fits(&self, config: &MachineConfig) -> Result<(), ResourcesError> {
        let Some(balloon) = &self.balloon else {
            return Ok(());
        };
        if balloon.amount_mib as usize > config.mem_size_mib {
            return Err(ResourcesError::BalloonLargerThanMemory);
        }
        if config.huge_pages != HugePageConfig::None {
            return Err(ResourcesError::BalloonHugePages);
        }
        Ok(())
    }

    /// Changes the fields of the machine configuration that `update` names.
    pub fn update_machine_config(
        &mut self,
        update: &MachineConfigUpdate,
    ) -> Result<(), ResourcesError> {
        let next = self.machine_config.updated(update)?;
        host::check_machine_config(&next)?;
        self.check_balloon_fits(&next)?;
        self.machine_config = next;
        Ok(())
    }

    /// Applies `PATCH /drives/{id}` before boot: a new backing file.
    pub fn update_drive(&mut self, update: &BlockDeviceUpdate) -> Result<(), ResourcesError> {
        if update
            .rate_limiter
            .as_ref()
            .is_some_and(RateLimiterConfig::limits_anything)
        {
            return Err(ResourcesError::RateLimiter(format!(
                "drive {:?}",
                update.drive_id
            )));
        }
        let drive = self
            .drives
            .iter()
            .find(|d| d.drive_id == update.drive_id)
            .ok_or_else(|| ResourcesError::UnknownDrive(update.drive_id.clone()))?;
        let mut next = drive.clone();
        next.path_on_host = update.path_on_host.clone().or(next.path_on_host);
        self.insert_drive(next)
    }

    /// Checks `PATCH /drives/{id}` on a running microVM: a new backing file
    /// is only for a drive with `path_on_host` (a `socket` drive's backend
    /// owns its file). Returns the new file, if any, for the VMM to open
    /// and to start the drive's next backend on.
    pub fn check_running_drive_update<'u>(
        &self,
        update: &'u BlockDeviceUpdate,
    ) -> Result<Option<&'u str>, ResourcesError> {
        let drive = self
            .drives
            .iter()
            .find(|d| d.drive_id == update.drive_id)
            .ok_or_else(|| ResourcesError::UnknownDrive(update.drive_id.clone()))?;
        if let (Some(path), Some(socket)) = (&update.path_on_host, &drive.socket) {
            return Err(ResourcesError::SocketDrivePath {
                id: update.drive_id.clone(),
                path: path.clone(),
                socket: socket.clone(),
            });
        }
        Ok(update.path_on_host.as_deref())
    }

    /// A running drive's limits after `update` (Firecracker's semantics:
    /// the buckets given replace the drive's); recorded for
    /// `GET /vm/config` and for the drive's next backends.
    pub fn update_running_drive_limits(
        &mut self,
        id: &str,
        update: &RateLimiterConfig,
    ) -> Result<RateLimiterConfig, ResourcesError> {
        let drive = self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == id)
            .ok_or_else(|| ResourcesError::UnknownDrive(id.to_string()))?;
        let limits = drive.rate_limiter.unwrap_or_default().updated(update);
        drive.rate_limiter = Some(limits);
        Ok(limits)
    }

    /// Records a running drive's new backing file (once its backend was
    /// switched to it), for `GET /vm/config`.
    pub fn set_running_drive_path(&mut self, id: &str, path: &str) {
        if let Some(drive) = self.drives.iter_mut().find(|d| d.drive_id == id) {
            drive.path_on_host = Some(path.to_string());
        }
    }

    /// A running interface's limits after `PATCH /network-interfaces/{id}`
    /// (Firecracker's semantics: the buckets given replace the
    /// interface's); `None` for a direction the update leaves alone.
    pub fn interface_limits_after(
        &self,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(Option<RateLimiterConfig>, Option<RateLimiterConfig>), ResourcesError> {
        let iface = self
            .network_interfaces
            .iter()
            .find(|n| n.iface_id == update.iface_id)
            .ok_or_else(|| ResourcesError::UnknownInterface(update.iface_id.clone()))?;
        let merged = |current: Option<RateLimiterConfig>, update: &Option<RateLimiterConfig>| {
            update
                .as_ref()
                .map(|u| current.unwrap_or_default().updated(u))
        };
        Ok((
            merged(iface.rx_rate_limiter, &update.rx_rate_limiter),
            merged(iface.tx_rate_limiter, &update.tx_rate_limiter),
        ))
    }

    /// Records a running interface's new limits (those given), for
    /// `GET /vm/config`.
    pub fn set_interface_limits(
        &mut self,
        id: &str,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) {
        if let Some(iface) = self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == id)
        {
            iface.rx_rate_limiter = rx.or(iface.rx_rate_limiter);
            iface.tx_rate_limiter = tx.or(iface.tx_rate_limiter);
        }
    }

    /// The configuration in the `--config-file` schema (`GET /vm/config`).
    pub fn to_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "boot-source": self.boot_source,
            "machine-config": self.machine_config,
            "drives": self.drives,
            "network-interfaces": self.network_interfaces,
            "logger": self.logger,
            "metrics": self.metrics,
            "serial": self.serial,
            "balloon": self.balloon,
            "vsock": self.vsock.as_ref().map(|v| &v.config),
            "mmds-config": self.mmds_config_json(),
            "entropy": self.entropy,
            "cpu-config": null,
        })
    }

    /// The MMDS configuration in force, as Firecracker shows it: with the
    /// address it answers on, and none once no interface serves it.
    fn mmds_config_json(&self) -> Option<MmdsConfig> {
        let config = self.mmds_config.as_ref()?;
        if config.network_interfaces.is_empty() {
            return None;
        }
        Some(MmdsConfig {
            ipv4_address: Some(config.ipv4()),
            ..config.clone()
        })
    }

    /// Sets which interfaces serve MMDS (each must be configured already),
    /// at which address and in which version.
    pub fn set_mmds_config(&mut self, config: MmdsConfig) -> Result<(), ResourcesError> {
        config.validate()?;
        let known = |id: &String| self.network_interfaces.iter().any(|n| &n.iface_id == id);
        if !config.network_interfaces.iter().all(known) {
            return Err(MmdsConfigError::InvalidNetworkInterfaceId.into());
        }
        self.mmds_config = Some(config);
        Ok(())
    }

    /// Adds or replaces a drive, keeping at most one root device.
    pub fn insert_drive(&mut self, drive: BlockDeviceConfig) -> Result<(), ResourcesError> {
        drive.validate()?;
        let other_root = self
            .drives
            .iter()
            .find(|d| d.is_root_device && d.drive_id != drive.drive_id);
        if drive.is_root_device {
            if let Some(other) = other_root {
                return Err(DriveError::SecondRootDevice(other.drive_id.clone()).into());
            }
        }
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(slot) => *slot = drive,
            None => self.drives.push(drive),
        }
        Ok(())
    }

    /// Adds or replaces a network interface.
    pub fn insert_network_interface(
        &mut self,
        iface: NetworkInterfaceConfig,
    ) -> Result<(), ResourcesError> {
        iface.validate()?;
        net::check_host_tap(&iface)?;
        self.insert_network_interface_for_backend(iface)
    }

    /// As [`Self::insert_network_interface`], leaving the host TAP for its
    /// backend to check when it opens it (a confined VMM thread, which
    /// hot-plugs, cannot look at network devices).
    pub fn insert_network_interface_for_backend(
        &mut self,
        iface: NetworkInterfaceConfig,
    ) -> Result<(), ResourcesError> {
        iface.validate()?;
        let sharing = self.network_interfaces.iter().find(|other| {
            other.iface_id != iface.iface_id
                && iface.host_dev_name.is_some()
                && other.host_dev_name == iface.host_dev_name
        });
        if let Some(other) = sharing {
            return Err(ResourcesError::SharedTap {
                id: iface.iface_id.clone(),
                name: iface.host_dev_name.clone().unwrap_or_default(),
                other: other.iface_id.clone(),
            });
        }
        let clash = self.network_interfaces.iter().find(|other| {
            other.iface_id != iface.iface_id
                && iface.guest_mac.is_some()
                && other.guest_mac == iface.guest_mac
        });
        if let Some(other) = clash {
            return Err(NetError::DuplicateMac(
                iface.guest_mac.clone().unwrap_or_default(),
                other.iface_id.clone(),
            )
            .into());
        }
        match self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == iface.iface_id)
        {
            Some(slot) => {
                // As in Firecracker, an interface put again is a new device,
                // without MMDS.
                if let Some(mmds) = &mut self.mmds_config {
                    mmds.network_interfaces.retain(|id| *id != iface.iface_id);
                }
                *slot = iface;
            }
            None => self.network_interfaces.push(iface),
        }
        Ok(())
    }
}

/// Whether a rate limiter has a bucket that would limit anything.
/// Firecracker clients often send `{"bandwidth": null, "ops": null}` or
/// `{}` for "no limit", and Firecracker ignores a bucket whose `size` or
/// `refill_time` is 0.
fn limits_anything(limiter: &serde_json::Value) -> bool {
    let bucket_limits = |bucket: &serde_json::Value| match bucket {
        serde_json::Value::Null => false,
        serde_json::Value::Object(fields) => ["size", "refill_time"]
            .iter()
            .all(|name| fields.get(*name).and_then(|v| v.as_u64()) != Some(0)),
        _ => true,
    };
    match limiter {
        serde_json::Value::Null => false,
        serde_json::Value::Object(buckets) => buckets.values().any(bucket_limits),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kernel_path() -> String {
        // Any existing file passes the path check; the kernel format is
        // checked when it is loaded.
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn parses_firecracker_config_file() {
        let json = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
              "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}},
              "drives": [{{"drive_id": "rootfs", "path_on_host": "{0}",
                          "is_root_device": true, "is_read_only": true}}],
              "network-interfaces": [{{"iface_id": "eth0", "socket": "/run/net.sock",
                                      "guest_mac": "06:00:ac:10:00:02"}}]
            }}"#,
            kernel_path()
        );
        let res = VmResources::from_json(&json).unwrap();
        assert_eq!(res.machine_config.vcpu_count, 2);
        assert_eq!(res.machine_config.mem_size_mib, 256);
        assert_eq!(
            res.boot_source.unwrap().boot_args.as_deref(),
            Some("console=ttyS0")
        );
        assert_eq!(res.drives.len(), 1);
        assert_eq!(
            res.network_interfaces[0].socket.as_deref(),
            Some("/run/net.sock")
        );
    }

    #[test]
    fn accepts_logger_metrics_and_round_trips_through_vm_config() {
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "logger": {{"level": "Debug", "show_level": true}},
                "metrics": {{"metrics_path": "/tmp/m.fifo"}}}}"#,
            kernel_path()
        );
        let res = VmResources::from_json(&json).unwrap();
        assert_eq!(res.metrics.as_ref().unwrap().metrics_path, "/tmp/m.fifo");
        let again = VmResources::from_json(&res.to_config_json().to_string()).unwrap();
        assert_eq!(again, res);
    }

    #[test]
    fn rejects_unknown_fields_and_unsupported_sections() {
        let k = kernel_path();
        let unknown = format!(r#"{{"boot-source": {{"kernel_image_path": "{k}", "bogus": 1}}}}"#);
        let err = VmResources::from_json(&unknown).unwrap_err().to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");

        let top = format!(r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "extra": {{}}}}"#);
        let err = VmResources::from_json(&top).unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");

        let mmds = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "mmds-config": {{"network_interfaces": []}}}}"#
        );
        let err = VmResources::from_json(&mmds).unwrap_err().to_string();
        assert_eq!(
            err,
            "MMDS config error: The list of network interface IDs that allow forwarding MMDS \
             requests is empty."
        );
        let cpu =
            format!(r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "cpu-config": {{}}}}"#);
        let err = VmResources::from_json(&cpu).unwrap_err().to_string();
        assert_eq!(err, "\"cpu-config\" is not supported by Tessera yet");
    }

    #[test]
    fn a_config_file_vsock_binds_its_socket_and_shows_in_vm_config() {
        let k = kernel_path();
        let path =
            std::env::temp_dir().join(format!("tessera-cfg-vsock-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "vsock": {{"guest_cid": 7, "uds_path": "{}"}}}}"#,
            path.display()
        );
        let res = VmResources::from_json(&json).unwrap();
        std::os::unix::net::UnixStream::connect(&path).expect("the socket is there");
        let shown = res.to_config_json();
        assert_eq!(shown["vsock"]["guest_cid"], 7);
        assert_eq!(shown["vsock"]["uds_path"], path.display().to_string());
        let bad = json.replace("\"guest_cid\": 7", "\"guest_cid\": 0");
        let err = VmResources::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("invalid guest CID \"0\""), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn rejects_a_second_root_device_and_duplicate_macs() {
        let k = kernel_path();
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "drives": [
                  {{"drive_id": "a", "path_on_host": "{k}", "is_root_device": true, "is_read_only": true}},
                  {{"drive_id": "b", "path_on_host": "{k}", "is_root_device": true, "is_read_only": true}}]}}"#
        );
        let err = VmResources::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("root device"), "{err}");

        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "network-interfaces": [
                  {{"iface_id": "a", "socket": "/run/a.sock", "guest_mac": "06:00:00:00:00:01"}},
                  {{"iface_id": "b", "socket": "/run/b.sock", "guest_mac": "06:00:00:00:00:01"}}]}}"#
        );
        let err = VmResources::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("06:00:00:00:00:01"), "{err}");
    }

    #[test]
    fn interface_rate_limiters_that_limit_are_refused_and_drive_ones_taken() {
        for empty in [
            json!(null),
            json!({}),
            json!({"bandwidth": null, "ops": null}),
            json!({"bandwidth": {"size": 0, "refill_time": 100}}),
            json!({"ops": {"size": 100, "refill_time": 0}}),
        ] {
            assert!(!limits_anything(&empty), "{empty}");
        }
        assert!(limits_anything(
            &json!({"bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 100}})
        ));
        let k = kernel_path();
        // A drive's limits are its backend's to enforce.
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "drives": [{{"drive_id": "a", "path_on_host": "{k}", "is_root_device": false,
                            "is_read_only": true,
                            "rate_limiter": {{"ops": {{"size": 10, "refill_time": 1000}}}}}}]}}"#
        );
        let resources = VmResources::from_json(&json).unwrap();
        assert!(resources.drives[0]
            .rate_limiter
            .is_some_and(|l| l.limits_anything()));
        // So are an interface's.
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "network-interfaces": [{{"iface_id": "eth0", "socket": "/nonexistent/net.sock",
                    "rx_rate_limiter": {{"ops": {{"size": 10, "refill_time": 1000}}}}}}]}}"#
        );
        let resources = VmResources::from_json(&json).unwrap();
        let iface = &resources.network_interfaces[0];
        assert!(iface.rx_rate_limiter.is_some_and(|l| l.limits_anything()));
        assert!(iface.tx_rate_limiter.is_none());
    }

    #[test]
    fn requires_a_boot_source() {
        let err = VmResources::from_json("{}").unwrap_err();
        assert!(matches!(err, ResourcesError::MissingBootSource));
    }
}
