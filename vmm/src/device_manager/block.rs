//! Block devices: one virtio-mmio device per drive, served by a
//! `vhost-user-blk` process: an external one (`socket`) or one the VMM starts
//! for the drive's host file (`path_on_host`). The root drive comes first, so
//! it is `/dev/vda`; the others follow in API order.

use std::path::Path;
use std::sync::{Arc, Mutex};

use api_server::config::BlockDeviceConfig;
use devices::vhost_user::blk::{VhostUserBlock, VhostUserBlockError};
use devices::vhost_user::{FrontendError, VhostUserDevice, VhostUserFrontend};
use devices::virtio::MmioTransport;
use devices::Bus;
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;

use super::backend_process::{BackendProcessError, BackendSpawner, BackendTarget};
use super::backend_watch::Connector;
use super::{place_on_bus, virtio_mmio_slot, wire_queues, MmioSlotError};
use crate::vstate::vm::Vm;

/// The most queues a block device gets.
pub const MAX_QUEUES: u64 = 8;
/// The serial number a drive reports (GET_ID) holds 20 bytes.
const SERIAL_LEN: usize = 20;

/// Errors attaching block devices.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    #[error("too many virtio devices: drive {0} has no MMIO slot or IRQ left")]
    NoSlot(String),
    #[error("drive {id}: {source}")]
    Backend {
        id: String,
        source: BackendProcessError,
    },
    #[error("drive {id}: {source}")]
    Frontend { id: String, source: FrontendError },
    #[error(transparent)]
    Device(#[from] VhostUserBlockError),
    #[error("drive {id}: {source}")]
    Attach { id: String, source: MmioSlotError },
    #[error("drive {id}: cannot add it to the kernel command line: {source}")]
    Cmdline {
        id: String,
        source: linux_loader::cmdline::Error,
    },
}

impl BlockDeviceError {
    /// A backend binary that cannot be used, before any drive is set up.
    pub fn from_spawner(source: BackendProcessError) -> Self {
        Self::Backend {
            id: "(all)".into(),
            source,
        }
    }
}

/// A block device on the MMIO bus.
pub type BlockTransport = Arc<Mutex<MmioTransport<VhostUserBlock>>>;

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
) -> Result<VhostUserFrontend, BlockDeviceError> {
    let id = &drive.drive_id;
    let frontend_err = |source| BlockDeviceError::Frontend {
        id: id.clone(),
        source,
    };
    if let Some(socket) = &drive.socket {
        return VhostUserFrontend::connect(Path::new(socket), MAX_QUEUES).map_err(frontend_err);
    }
    let disk = BackendTarget::Disk {
        path: drive.path_on_host.as_deref().unwrap_or_default(),
        read_only: drive.is_read_only.unwrap_or(false),
    };
    let serial: String = id.chars().take(SERIAL_LEN).collect();
    let args = [
        "--queues".to_string(),
        queues.to_string(),
        "--serial".to_string(),
        serial,
    ];
    let stream = spawner
        .spawn(id, disk, &args)
        .map_err(|source| BlockDeviceError::Backend {
            id: id.clone(),
            source,
        })?;
    VhostUserFrontend::from_stream(stream, MAX_QUEUES).map_err(frontend_err)
}

/// What brings a new backend for `drive` (started again, or reconnected to
/// its socket) when its backend is gone.
fn connector(drive: &BlockDeviceConfig, spawner: &BackendSpawner, queues: u64) -> Connector {
    let drive = drive.clone();
    let spawner = spawner.clone();
    Box::new(move || connect(&drive, &spawner, queues).map_err(|err| err.to_string()))
}

/// Creates a device per drive, wires its queues (ioeventfd per queue on
/// QueueNotify, irqfd per queue on its IRQ), puts it on the MMIO bus and
/// adds its `virtio_mmio.device=` (and `root=`) entries to `cmdline`.
/// Each device comes with what brings it a new backend.
pub fn attach_block_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    drives: &[BlockDeviceConfig],
    spawner: &BackendSpawner,
    queues: u64,
    mmio_bus: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<Vec<(BlockTransport, Connector)>, BlockDeviceError> {
    let mut transports = Vec::new();
    for (index, drive) in device_order(drives).into_iter().enumerate() {
        let id = drive.drive_id.clone();
        let (base, irq) =
            virtio_mmio_slot(index).ok_or_else(|| BlockDeviceError::NoSlot(id.clone()))?;
        let queues = queues.clamp(1, MAX_QUEUES);
        let frontend = connect(drive, spawner, queues)?;
        let device = VhostUserBlock::new(&id, frontend, mem.clone())?;
        let attach_err = |source| BlockDeviceError::Attach {
            id: id.clone(),
            source,
        };
        wire_queues(vm, base, irq, device.queues()).map_err(attach_err)?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(device)));
        place_on_bus(transport.clone(), base, irq, mmio_bus, cmdline).map_err(attach_err)?;
        let cmdline_err = |source| BlockDeviceError::Cmdline {
            id: id.clone(),
            source,
        };
        if drive.is_root_device {
            let root = match &drive.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            let mode = if drive.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            cmdline.insert_str(root).map_err(cmdline_err)?;
            cmdline.insert_str(mode).map_err(cmdline_err)?;
        }
        log::info!("drive {id}: virtio-mmio at {base:#x}, IRQ {irq}");
        transports.push((transport, connector(drive, spawner, queues)));
    }
    Ok(transports)
}
