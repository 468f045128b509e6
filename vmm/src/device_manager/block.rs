//! Block devices: one virtio device per drive, served by a
//! `vhost-user-blk` process: an external one (`socket`) or one the VMM starts
//! for the drive's host file (`path_on_host`). The root drive comes first, so
//! it is `/dev/vda`; the others follow in API order. A drive's rate limits
//! go to its backend as a control message, before the guest starts the
//! device, and again to every backend that takes over.

use std::sync::{Arc, Mutex};

use devices::vhost_user::blk::VhostUserBlock;
use devices::vhost_user::{VhostUserDevice as _, VhostUserFrontend};
use devices::virtio::VirtioTransport;
use linux_loader::loader::Cmdline;
use tessera_backend_control::{ControlMessage, LimitTarget};
use tessera_rate_limiter::RateLimiterConfig;
use vm_memory::GuestMemoryMmap;
use vmm_config::BlockDeviceConfig;

use super::backend_process::{BackendSpawner, BackendTarget};
use super::backend_watch::Connector;
use super::placement::Placement;
use super::vhost_user::{self, AttachError, BackendSource, DeviceKind};

/// The most queues a block device gets.
pub const MAX_QUEUES: u64 = 8;
/// The serial number a drive reports (GET_ID) holds 20 bytes.
const SERIAL_LEN: usize = 20;

/// A block device on its transport.
pub type BlockTransport = Arc<Mutex<VirtioTransport<VhostUserBlock>>>;

/// The control message that gives a drive's backend its limits.
pub fn drive_limits_message(limits: RateLimiterConfig) -> ControlMessage {
    ControlMessage::RateLimits {
        target: LimitTarget::Device,
        limits,
    }
}

/// The drives in device order: the root drive first, then the others.
pub fn device_order(drives: &[BlockDeviceConfig]) -> Vec<&BlockDeviceConfig> {
    let root = drives.iter().filter(|d| d.is_root_device);
    let others = drives.iter().filter(|d| !d.is_root_device);
    root.chain(others).collect()
}

fn connect(
    drive: &BlockDeviceConfig,
    spawner: &BackendSpawner,
    queues: u64,
) -> Result<VhostUserFrontend, AttachError> {
    let id = &drive.drive_id;
    let serial: String = id.chars().take(SERIAL_LEN).collect();
    let source = BackendSource {
        socket: drive.socket.as_deref(),
        target: BackendTarget::Disk {
            path: drive.path_on_host.as_deref().unwrap_or_default(),
            read_only: drive.is_read_only.unwrap_or(false),
        },
        args: vec![
            "--queues".to_string(),
            queues.to_string(),
            "--serial".to_string(),
            serial,
        ],
        max_queues: MAX_QUEUES,
    };
    vhost_user::connect(DeviceKind::Drive, id, source, spawner)
}

/// What brings a new backend for `drive` (started again, or reconnected to
/// its socket) when its backend is gone.
fn connector(drive: &BlockDeviceConfig, spawner: &BackendSpawner, queues: u64) -> Connector {
    let drive = drive.clone();
    let spawner = spawner.clone();
    Box::new(move || connect(&drive, &spawner, queues).map_err(|err| err.to_string()))
}

/// `root=` (`/dev/vda`, or the drive's partition UUID) and `ro` or `rw`.
fn root_cmdline(
    drive: &BlockDeviceConfig,
    cmdline: &mut Cmdline,
) -> Result<(), linux_loader::cmdline::Error> {
    let root = match &drive.partuuid {
        Some(uuid) => format!("root=PARTUUID={uuid}"),
        None => "root=/dev/vda".to_string(),
    };
    cmdline.insert_str(root)?;
    cmdline.insert_str(if drive.is_read_only.unwrap_or(false) {
        "ro"
    } else {
        "rw"
    })
}

/// Creates a device per drive and places it (see [`Placement`]), adding
/// `root=` to the kernel command line for the root drive. Each device
/// comes with what brings it a new backend.
pub fn attach_block_devices(
    mem: &GuestMemoryMmap,
    drives: &[BlockDeviceConfig],
    spawner: &BackendSpawner,
    queues: u64,
    placement: &mut Placement,
) -> Result<Vec<(BlockTransport, Connector)>, AttachError> {
    device_order(drives)
        .into_iter()
        .map(|drive| attach_block_device(mem, drive, spawner, queues, placement))
        .collect()
}

/// Creates the device of `drive` with up to `queues` queues and places it.
pub fn attach_block_device(
    mem: &GuestMemoryMmap,
    drive: &BlockDeviceConfig,
    spawner: &BackendSpawner,
    queues: u64,
    placement: &mut Placement,
) -> Result<(BlockTransport, Connector), AttachError> {
    let id = drive.drive_id.clone();
    let queues = queues.clamp(1, MAX_QUEUES);
    vhost_user::check_room(placement, DeviceKind::Drive, &id)?;
    let frontend = connect(drive, spawner, queues)?;
    let mut device = VhostUserBlock::new(&id, frontend, mem.clone())?;
    if let Some(limits) = drive
        .rate_limiter
        .filter(RateLimiterConfig::limits_anything)
    {
        device
            .queues_mut()
            .send_control(&drive_limits_message(limits))
            .map_err(|source| AttachError::Frontend {
                kind: DeviceKind::Drive,
                id: id.clone(),
                source,
            })?;
    }
    let transport = vhost_user::attach(device, spawner, placement)?;
    if drive.is_root_device {
        root_cmdline(drive, placement.cmdline()).map_err(|source| AttachError::Cmdline {
            kind: DeviceKind::Drive,
            id: id.clone(),
            source,
        })?;
    }
    Ok((transport, connector(drive, spawner, queues)))
}
