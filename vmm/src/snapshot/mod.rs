//! Snapshots: what a paused microVM is (its vCPUs, the VM's interrupt
//! controllers, PIT and clock, the legacy devices, its configuration) in a
//! checked state file ([`file`]), and its guest memory in a memory file,
//! every region one after another. A load builds a new microVM from the
//! two (see `builder::load_microvm`).

pub mod dirty;
pub mod file;
pub mod lazy;
pub mod load;
pub mod uffd;

use std::path::Path;
use std::sync::Mutex;

use devices::legacy::i8042::I8042State;
use devices::legacy::serial::SerialDeviceState;
use devices::vhost_user::{VhostUserDevice, VhostUserQueuesState};
use devices::virtio::{PciTransportState, VirtioState, VirtioTransport};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vstate::vcpu::VcpuError;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::{VmError, VmState};
pub use file::StateFileError;

/// What fills a loaded snapshot's guest memory on demand, kept for the
/// microVM's life.
pub enum OnDemandMemory {
    /// A page-fault handler of the `Uffd` memory backend.
    Handler(uffd::PageFaultHandler),
    /// The VMM's own, from the memory file, where backends share memory.
    Lazy(lazy::LazyMemory),
}

/// Everything a load needs but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration in the `--config-file` schema (`GET /vm/config`).
    pub config: serde_json::Value,
    /// Guest RAM regions (guest address, length), in memory-file order.
    pub memory: Vec<(u64, u64)>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialDeviceState,
    pub i8042: I8042State,
    /// The drives and the network interfaces, each in the order they
    /// were attached (their virtio-mmio slots).
    #[serde(default)]
    pub drives: Vec<VhostUserDeviceState>,
    #[serde(default)]
    pub interfaces: Vec<VhostUserDeviceState>,
    #[serde(default)]
    pub vsock: Option<VhostUserDeviceState>,
    /// The entropy device's transport: its queue goes on from the used
    /// index (the VMM answered every request before the snapshot).
    #[serde(default)]
    pub entropy: Option<VirtioState>,
    /// The entropy device's PCI function, with `--enable-pci`.
    #[serde(default)]
    pub entropy_pci: Option<PciTransportState>,
    /// The balloon device: its transport, target and size.
    #[serde(default)]
    pub balloon: Option<BalloonSnapshot>,
}

impl MicrovmState {
    /// With the devices on PCI, the slot of each, in the order `resources`
    /// (the snapshot's configuration) places them: a device hot-plugged
    /// into a hole another left goes back there.
    pub fn pci_slots(&self, resources: &crate::resources::VmResources) -> Option<Vec<u8>> {
        if !self.uses_pci() {
            return None;
        }
        let slot_of = |states: &[VhostUserDeviceState], id: &str| {
            states
                .iter()
                .find(|s| s.id == id)
                .and_then(|s| s.pci.as_ref())
                .map(|p| p.slot)
        };
        let drives = crate::device_manager::device_order(&resources.drives)
            .into_iter()
            .filter_map(|d| slot_of(&self.drives, &d.drive_id));
        let interfaces = resources
            .network_interfaces
            .iter()
            .filter_map(|i| slot_of(&self.interfaces, &i.iface_id));
        let vsock = self
            .vsock
            .iter()
            .filter_map(|v| v.pci.as_ref().map(|p| p.slot));
        let entropy = self.entropy_pci.iter().map(|p| p.slot);
        let balloon = self
            .balloon
            .iter()
            .filter_map(|b| b.pci.as_ref().map(|p| p.slot));
        Some(
            drives
                .chain(interfaces)
                .chain(vsock)
                .chain(entropy)
                .chain(balloon)
                .collect(),
        )
    }

    /// Whether the snapshot's devices are on PCI.
    pub fn uses_pci(&self) -> bool {
        let vhost_user = self
            .drives
            .iter()
            .chain(&self.interfaces)
            .chain(&self.vsock);
        vhost_user.into_iter().any(|d| d.pci.is_some())
            || self.entropy_pci.is_some()
            || self.balloon.as_ref().is_some_and(|b| b.pci.is_some())
    }
}

/// The balloon device in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    pub transport: VirtioState,
    /// Its PCI function, with `--enable-pci`.
    #[serde(default)]
    pub pci: Option<PciTransportState>,
    pub device: devices::virtio::balloon::BalloonState,
}

/// One vhost-user device: what its guest driver set up on the transport,
/// and what the VMM keeps for its backends. Requests in flight are not
/// part of it: the snapshot waits until the backend has completed them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VhostUserDeviceState {
    pub id: String,
    pub transport: VirtioState,
    /// Its PCI function, with `--enable-pci` (the transport follows the
    /// snapshot, not the loading process's flag).
    #[serde(default)]
    pub pci: Option<PciTransportState>,
    pub queues: VhostUserQueuesState,
}

/// Errors creating a snapshot; each says which step failed. Firecracker's
/// texts where it has the same error.
#[derive(Debug, thiserror::Error)]
pub enum CreateSnapshotError {
    #[error("Cannot save the microVM state: Operation not allowed: save/restore unavailable while running")]
    NotPaused,
    #[error("Cannot save the microVM state: a live migration is under way")]
    Migrating,
    #[error("Cannot save the microVM state: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("Cannot save the microVM state: {0}")]
    Vm(#[from] VmError),
    #[error(
        "Cannot save the microVM state: {device}: its backend did not stop its queues: {reason}"
    )]
    Suspend { device: String, reason: String },
    #[error("Cannot perform {op} on the memory backing file: {reason}")]
    Memory { op: &'static str, reason: String },
    #[error(transparent)]
    StateFile(#[from] StateFileError),
}

/// Writes every region of `mem` to a new file at `path`, one after
/// another.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<(), CreateSnapshotError> {
    file::write_replacing(path, |file| {
        for region in mem.iter() {
            mem.write_all_volatile_to(region.start_addr(), file, region.len() as usize)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    })
    .map_err(|err| CreateSnapshotError::Memory {
        op: "write",
        reason: format!("{}: {err}", path.display()),
    })
}

/// Stops the queues of the device behind `transport` (its backend
/// completes its requests in flight first) and returns its state.
pub fn suspend_device<D: VhostUserDevice>(
    transport: &Mutex<VirtioTransport<D>>,
) -> Result<VhostUserDeviceState, CreateSnapshotError> {
    let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
    let queues = transport.device_mut().queues_mut();
    queues
        .suspend()
        .map_err(|err| CreateSnapshotError::Suspend {
            device: queues.device().to_string(),
            reason: err.to_string(),
        })?;
    Ok(VhostUserDeviceState {
        id: queues.device().id.clone(),
        queues: queues.state(),
        transport: transport.state(),
        pci: transport.pci_state(),
    })
}

/// After a snapshot, the device behind `transport` takes its queues up
/// again from their used indexes on the same backend connection, as a
/// loaded one does; if that fails, the backend is hung up on and the
/// backend monitor brings in a new one.
pub fn resume_device<D: VhostUserDevice>(transport: &Mutex<VirtioTransport<D>>) {
    let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
    let state = transport.state();
    let pci = transport.pci_state();
    if !state.is_active() {
        return;
    }
    let queues = transport.device_mut().queues_mut();
    let resumed = queues
        .prepare_restore(&Default::default(), true)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            transport
                .restore(&state, pci.as_ref())
                .map_err(|e| e.to_string())
        });
    if let Err(err) = resumed {
        let queues = transport.device().queues();
        log::warn!(
            "{}: its queues did not start again after the snapshot ({err}); a new backend takes them over",
            queues.device()
        );
        queues.hang_up();
    }
}

/// The guest RAM layout of `mem`, as the state file records it.
pub fn memory_layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|region| (region.start_addr().0, region.len()))
        .collect()
}
