//! The typed actions the API asks of the VMM, and their outcomes.

use vmm_config::{
    BalloonDeviceConfig, BalloonStats, BalloonUpdateConfig, BalloonUpdateStatsConfig,
    BlockDeviceConfig, BlockDeviceUpdate, BootSourceConfig, CreateSnapshotParams,
    EntropyDeviceConfig, HintingStatus, InstanceInfo, LoadSnapshotParams, LoggerConfig,
    MachineConfig, MachineConfigUpdate, MetricsConfig, MigrationReceiveParams, MigrationSendParams,
    MigrationStatus, MmdsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdate, SerialConfig,
    StartHintingCmd, VsockDeviceConfig,
};

/// One request for the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    GetInstanceInfo,
    GetVmConfig,
    GetMachineConfig,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutBootSource(BootSourceConfig),
    PutDrive(BlockDeviceConfig),
    PatchDrive(BlockDeviceUpdate),
    /// Hot-unplug (with `--enable-pci`, after boot).
    DeleteDrive(String),
    PutNetworkInterface(NetworkInterfaceConfig),
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// Hot-unplug (with `--enable-pci`, after boot).
    DeleteNetworkInterface(String),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    PutSerial(SerialConfig),
    PutVsock(VsockDeviceConfig),
    PutEntropy(EntropyDeviceConfig),
    PutBalloon(BalloonDeviceConfig),
    PatchBalloon(BalloonUpdateConfig),
    GetBalloon,
    PatchBalloonStatistics(BalloonUpdateStatsConfig),
    GetBalloonStatistics,
    StartBalloonHinting(StartHintingCmd),
    StopBalloonHinting,
    GetBalloonHintingStatus,
    PutMmds(serde_json::Value),
    PutMmdsConfig(MmdsConfig),
    PatchMmds(serde_json::Value),
    GetMmds,
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    CreateSnapshot(CreateSnapshotParams),
    LoadSnapshot(LoadSnapshotParams),
    /// Tessera's live migration.
    SendMigration(MigrationSendParams),
    ReceiveMigration(MigrationReceiveParams),
    CancelMigration,
    GetMigration,
}

/// What a successful action returns.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmData {
    Empty,
    InstanceInfo(InstanceInfo),
    MachineConfig(MachineConfig),
    /// The full configuration, in the `--config-file` schema.
    VmConfig(serde_json::Value),
    MigrationStatus(MigrationStatus),
    BalloonConfig(BalloonDeviceConfig),
    BalloonStats(BalloonStats),
    HintingStatus(HintingStatus),
    /// The metadata store.
    Mmds(serde_json::Value),
}

/// Why the VMM refused an action; answered as 400 with the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("The requested operation is not supported before starting the microVM.")]
    NotSupportedPreBoot,
    #[error("The requested operation is not supported after starting the microVM.")]
    NotSupportedPostBoot,
    #[error("{0}")]
    Failed(String),
    /// Answered 413 (the metadata store's limit).
    #[error("{0}")]
    TooLarge(String),
}

impl ActionError {
    /// An action that failed for `reason`.
    pub fn failed(reason: impl std::fmt::Display) -> Self {
        Self::Failed(reason.to_string())
    }
}
