//! The schema of Tessera's configuration: Firecracker's API bodies and
//! `--config-file` sections, one resource per file. Each type validates
//! itself; errors name the bad value.

mod balloon;
mod boot_source;
mod drive;
mod entropy;
mod host_file;
mod logger;
mod machine_config;
mod metrics;
mod migration;
mod mmds;
mod net;
mod serial;
mod snapshot;
mod vm;
mod vsock;

pub use balloon::{
    BalloonDeviceConfig, BalloonError, BalloonStats, BalloonUpdateConfig, BalloonUpdateStatsConfig,
    HintingStatus, StartHintingCmd, PAGES_PER_MIB,
};
pub use boot_source::{BootSourceConfig, BootSourceError, DEFAULT_KERNEL_CMDLINE};
pub use drive::{BlockDeviceConfig, BlockDeviceUpdate, CacheType, DriveError, IoEngine};
pub use entropy::EntropyDeviceConfig;
pub use host_file::{check_disk, kind_of, open_regular, HostFileError};
pub use logger::{LoggerConfig, LoggerError, LoggerLevel};
pub use machine_config::{
    HugePageConfig, MachineConfig, MachineConfigError, MachineConfigUpdate, MAX_MEM_SIZE_MIB,
    MAX_SUPPORTED_VCPUS, MIN_MEM_SIZE_MIB,
};
pub use metrics::MetricsConfig;
pub use migration::{
    MigrationPhase, MigrationReceiveParams, MigrationSendParams, MigrationStatus, MigrationUrl,
    MigrationUrlError, DEFAULT_MAX_DOWNTIME_MS,
};
pub use mmds::{
    MmdsConfig, MmdsConfigError, MmdsError, MmdsStore, MmdsVersion, DEFAULT_MMDS_IPV4,
    DEFAULT_MMDS_SIZE_LIMIT,
};
pub use net::{parse_mac, NetError, NetworkInterfaceConfig, NetworkInterfaceUpdate};
pub use serial::{SerialConfig, SerialError};
pub use snapshot::{
    CreateSnapshotParams, DriveOverride, LoadSnapshotParams, MemBackendConfig, MemBackendType,
    NetworkOverride, SnapshotType, VsockOverride, LOAD_MISSING_FIELD, LOAD_TOO_MANY_FIELDS,
};
pub use vm::{
    ActionType, InstanceActionInfo, InstanceInfo, RequestedVmState, VmState, VmStateRequest,
};
pub use vsock::{VsockDeviceConfig, VsockError, MAX_UDS_PATH_LEN};

/// Firecracker's rule for resource ids ([`tessera_types::DeviceId`]).
pub fn is_valid_id(id: &str) -> bool {
    id.parse::<tessera_types::DeviceId>().is_ok()
}
