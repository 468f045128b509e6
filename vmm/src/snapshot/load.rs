//! `PUT /snapshot/load`: a new microVM from a state file and a memory
//! file. Everything is checked and built before a vCPU runs; on an error
//! whatever was built is dropped, so nothing is left behind.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm_config::{
    DriveOverride, LoadSnapshotParams, MemBackendType, NetworkOverride, VsockOverride,
};

use devices::vhost_user::VhostUserDevice;
use devices::virtio::VirtioTransport;
use linux_loader::loader::Cmdline;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::lazy::LazyMemory;
use super::uffd::UffdHandshakeError;
use super::{file, MicrovmState, OnDemandMemory, StateFileError, VhostUserDeviceState};
use crate::arch::cpu_features::CpuFeatures;
use crate::builder::{self, AttachedDevices, BootOptions, Parts, StartMicrovmError};
use crate::memory::{self, MemoryError};
use crate::resources::{ResourcesError, VmResources};
use crate::runtime::Vmm;
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors loading a snapshot, named after the step, in Firecracker's words
/// where it has the same step.
#[derive(Debug, thiserror::Error)]
pub enum LoadSnapshotError {
    #[error("Failed to get snapshot state from file: {0}")]
    StateFile(#[from] StateFileError),
    #[error("Failed to get snapshot state from file: its configuration does not load: {0}")]
    Config(ResourcesError),
    #[error("Failed to get snapshot state from file: Unknown Network Device.")]
    UnknownNetworkDevice,
    #[error("Failed to get snapshot state from file: Unknown Vsock Device.")]
    UnknownVsockDevice,
    #[error("Failed to get snapshot state from file: drive_overrides names drive {0}, which the snapshot does not have")]
    UnknownDrive(String),
    #[error(
        "Failed to get snapshot state from file: it has {states} vCPU states for {vcpus} vCPUs"
    )]
    VcpuCount { states: usize, vcpus: u8 },
    #[error("Failed to get snapshot state from file: its memory layout {found:x?} is not the one of its machine configuration, {expected:x?}")]
    Layout {
        found: Vec<(u64, u64)>,
        expected: Vec<(u64, u64)>,
    },
    #[error("Failed to load guest memory: Error creating guest memory from uffd: the Uffd memory backend cannot serve guest memory that vhost-user backends share (drives, network interfaces, vsock); use File")]
    UffdWithBackends,
    #[error("Failed to load guest memory: Error creating guest memory from uffd: {0}")]
    Uffd(#[from] UffdHandshakeError),
    #[error("Failed to load guest memory: Error creating guest memory from file: Failed to load guest memory: {path}: {source}")]
    MemoryFile {
        path: String,
        source: std::io::Error,
    },
    #[error("Failed to load guest memory: Error creating guest memory from file: Failed to restore guest memory: Total sum of memory regions exceeds largest possible file offset ({path} is {found} bytes, the snapshot's memory {expected})")]
    MemoryFileSize {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("Failed to load guest memory: Error creating guest memory from file: {0}")]
    Memory(#[from] MemoryError),
    #[error("Failed to build microVM from snapshot: {0}")]
    Build(#[from] StartMicrovmError),
    #[error("Failed to build microVM from snapshot: Failed to restore microVM state: {0}")]
    Vm(#[from] VmError),
    #[error("Failed to build microVM from snapshot: Failed to restore microVM state: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("Failed to build microVM from snapshot: Failed to restore microVM state: the serial port: {0}")]
    Serial(std::io::Error),
    #[error("Failed to build microVM from snapshot: Failed to restore microVM state: {0}")]
    Device(String),
    #[error("Failed to load guest memory: Error creating guest memory from file: cannot read {path}: {reason}")]
    ReadMemory { path: String, reason: String },
}

/// Loads the snapshot `params` names and starts its vCPUs, paused unless
/// `resume_vm`.
/// `current` is what the loading process was given before the load: its
/// logger, metrics and serial output are the loaded microVM's (a clone
/// does not write to its source's console file).
pub fn load_microvm(
    params: &LoadSnapshotParams,
    options: &BootOptions,
    current: &VmResources,
) -> Result<Vmm, LoadSnapshotError> {
    let state: MicrovmState = file::read(&params.snapshot_path)?;
    let overrides = Overrides {
        network: &params.network_overrides,
        drives: &params.drive_overrides,
        vsock: params.vsock_override.as_ref(),
    };
    let mut resources = resources_from_config(&state.config, &overrides)?;
    // Dirty pages are tracked as the load asks, whatever the snapshotted
    // microVM did (Firecracker's rule): GET /vm/config shows it.
    resources.machine_config.track_dirty_pages = params.track_dirty_pages;
    resources.logger.clone_from(&current.logger);
    resources.metrics.clone_from(&current.metrics);
    resources.serial.clone_from(&current.serial);
    // The store is not in a snapshot (as in Firecracker): the loading
    // process's own, from `--metadata` or a PUT before the load.
    resources.mmds.clone_from(&current.mmds);
    // The vsock host socket is bound by now: a failed load removes it, so
    // that nothing is left behind and the same path loads again.
    let bound = (resources.vsock.as_ref())
        .filter(|v| v.listener.is_some())
        .map(|v| v.config.uds_path.clone());
    build(state, resources, params, options).inspect_err(|_| {
        if let Some(path) = &bound {
            let _ = std::fs::remove_file(path);
        }
    })
}

/// Builds the microVM of a checked snapshot.
fn build(
    state: MicrovmState,
    resources: VmResources,
    params: &LoadSnapshotParams,
    options: &BootOptions,
) -> Result<Vmm, LoadSnapshotError> {
    let uffd = params.mem_backend.backend_type == MemBackendType::Uffd;
    if uffd && builder::has_backends(&resources) {
        return Err(LoadSnapshotError::UffdWithBackends);
    }
    let expected =
        crate::arch::layout::ram_regions((resources.machine_config.mem_size_mib as u64) << 20);
    if state.memory != expected {
        return Err(LoadSnapshotError::Layout {
            found: state.memory.clone(),
            expected,
        });
    }
    let mem_file = (!uffd)
        .then(|| memory_file(&params.mem_backend.backend_path, &state.memory))
        .transpose()?;
    let machine = &resources.machine_config;
    if state.vcpus.len() != usize::from(machine.vcpu_count) {
        return Err(LoadSnapshotError::VcpuCount {
            states: state.vcpus.len(),
            vcpus: machine.vcpu_count,
        });
    }
    builder::open_kvm(machine.vcpu_count)?;
    let memory = match &mem_file {
        Some(file) => guest_memory(&resources, file, &state.memory, params, options)?,
        None => {
            let mem = builder::create_guest_memory(&resources, false)?;
            let page_size = machine.huge_pages.page_size();
            let handler =
                super::uffd::hand_to_handler(&mem, page_size, &params.mem_backend.backend_path)?;
            (mem, Some(OnDemandMemory::Handler(handler)))
        }
    };
    let start = Start {
        resume_vm: params.resume_vm,
        clock_realtime: params.clock_realtime,
        fresh_memory: false,
    };
    let vmm = assemble(state, resources, memory, &expected, options, start)?;
    vmm.announce_guest();
    log::info!(
        "snapshot {} loaded{}",
        params.snapshot_path.display(),
        if params.resume_vm {
            " and resumed"
        } else {
            ", paused"
        }
    );
    Ok(vmm)
}

/// How a built microVM starts.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// Run at once, or wait paused for a resume.
    pub resume_vm: bool,
    /// Move the guest's clock on by the time since its state was taken.
    pub clock_realtime: bool,
    /// Guest memory started as zeros and every page that is not was
    /// written into it (a received migration), rather than mapped from or
    /// filled on demand from a memory file (a load).
    pub fresh_memory: bool,
}

/// Builds a microVM from its state and its guest memory (filled, or
/// filled on demand) and starts its vCPUs: what a load and an incoming
/// migration share.
pub fn assemble(
    state: MicrovmState,
    resources: VmResources,
    (guest_memory, on_demand_memory): (GuestMemoryMmap, Option<OnDemandMemory>),
    layout: &[(u64, u64)],
    options: &BootOptions,
    start: Start,
) -> Result<Vmm, LoadSnapshotError> {
    if state.memory != layout {
        return Err(LoadSnapshotError::Layout {
            found: state.memory.clone(),
            expected: layout.to_vec(),
        });
    }
    let machine = &resources.machine_config;
    if state.vcpus.len() != usize::from(machine.vcpu_count) {
        return Err(LoadSnapshotError::VcpuCount {
            states: state.vcpus.len(),
            vcpus: machine.vcpu_count,
        });
    }
    let kvm = builder::open_kvm(machine.vcpu_count)?;
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&kvm, &guest_memory, machine.track_dirty_pages)?;
    let mut legacy = builder::attach_legacy_devices(&vm, &resources, options)?;
    // The guest's kernel has its command line already.
    let mut unused_cmdline = Cmdline::new(crate::arch::layout::CMDLINE_MAX_SIZE)
        .map_err(|e| LoadSnapshotError::Device(e.to_string()))?;
    // The transport follows the snapshot, not this process's flag.
    let attached = builder::attach_virtio_devices(
        &vm,
        &guest_memory,
        &resources,
        options,
        state.pci_slots(&resources),
        &mut legacy,
        &mut unused_cmdline,
    )?;
    if let Some(OnDemandMemory::Lazy(lazy)) = &on_demand_memory {
        attached.share_page_fault_server(&lazy.server());
    }
    legacy
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .restore(&state.serial)
        .map_err(LoadSnapshotError::Serial)?;
    legacy
        .i8042
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .restore(&state.i8042);
    let buses = (Arc::new(legacy.pio_bus), Arc::new(legacy.mmio_bus));
    let msr_list = builder::saveable_msrs(&kvm)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in (0u8..).zip(&state.vcpus) {
        let vcpu = Vcpu::new(vm.fd(), index, buses.clone(), msr_list.clone())?;
        vcpu.restore(saved)?;
        vcpus.push(vcpu);
    }
    // After the vCPUs, as Firecracker: the clock and the interrupt
    // controllers go in last.
    vm.restore_state(&state.vm, start.clock_realtime)?;
    // The devices last: the interrupts their takeover raises must land in
    // the restored interrupt controllers, not be overwritten by them.
    restore_devices(&attached, &state)?;
    let parts = Parts {
        guest_memory,
        vm,
        vcpus,
        serial: legacy.serial,
        i8042: legacy.i8042,
        reset_evt: legacy.reset_evt,
        attached,
        on_demand_memory,
        fresh_memory: start.fresh_memory,
        guest_cpu: CpuFeatures::of(state.vcpus.first().map_or(&[], |v| &v.cpuid)),
    };
    Ok(builder::run_microvm(
        parts,
        resources,
        options,
        !start.resume_vm,
    )?)
}

/// Guest RAM for the loaded microVM: the memory file mapped copy-on-write
/// when only this process maps RAM; where backends share it, a memfd
/// filled from the file on demand ([`LazyMemory`]), or, on a host where
/// this process may not handle kernel page faults (a userfaultfd needs
/// CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd`), copied in whole.
fn guest_memory(
    resources: &VmResources,
    file: &File,
    regions: &[(u64, u64)],
    params: &LoadSnapshotParams,
    options: &BootOptions,
) -> Result<(GuestMemoryMmap, Option<OnDemandMemory>), LoadSnapshotError> {
    if !builder::has_backends(resources) {
        return Ok((memory::map_snapshot_memory(file, regions)?, None));
    }
    let mem = builder::create_guest_memory(resources, false)?;
    let layout: Vec<(u64, u64)> = mem
        .iter()
        .map(|region| (region.start_addr().0, region.len()))
        .collect();
    let read_err = |reason: String| LoadSnapshotError::ReadMemory {
        path: params.mem_backend.backend_path.display().to_string(),
        reason,
    };
    if layout != regions {
        return Err(read_err(format!(
            "the snapshot's memory layout {regions:x?} is not this machine's {layout:x?}"
        )));
    }
    match LazyMemory::start(&mem, file, options.seccomp.clone()) {
        Ok(lazy) => {
            log::info!(
                "guest memory is filled from {} on demand",
                params.mem_backend.backend_path.display()
            );
            return Ok((mem, Some(OnDemandMemory::Lazy(lazy))));
        }
        Err(err) => log::info!("guest memory is copied in whole: {err}"),
    }
    let mut reader = file;
    for region in mem.iter() {
        mem.read_exact_volatile_from(region.start_addr(), &mut reader, region.len() as usize)
            .map_err(|e| read_err(e.to_string()))?;
    }
    Ok((mem, None))
}

/// Gives each drive and interface its saved transport and queue state:
/// its new backend takes the queues over from their used indexes.
fn restore_devices(
    attached: &AttachedDevices,
    state: &MicrovmState,
) -> Result<(), LoadSnapshotError> {
    for (transport, _) in &attached.block {
        restore_device(transport, &state.drives)?;
    }
    for (transport, _) in &attached.net {
        restore_device(transport, &state.interfaces)?;
    }
    if let Some((transport, _)) = &attached.vsock {
        restore_device(transport, state.vsock.as_slice())?;
    }
    if let Some(transport) = &attached.entropy {
        let saved = state.entropy.as_ref().ok_or_else(|| {
            LoadSnapshotError::Device("entropy: the snapshot has no state for it".into())
        })?;
        let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
        transport.device_mut().prepare_restore();
        transport
            .restore(saved, state.entropy_pci.as_ref())
            .map_err(|e| LoadSnapshotError::Device(format!("entropy: {e}")))?;
    }
    if let Some(transport) = &attached.balloon {
        let saved = state.balloon.as_ref().ok_or_else(|| {
            LoadSnapshotError::Device("balloon: the snapshot has no state for it".into())
        })?;
        let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
        transport.device_mut().restore(&saved.device);
        transport
            .restore(&saved.transport, saved.pci.as_ref())
            .map_err(|e| LoadSnapshotError::Device(format!("balloon: {e}")))?;
    }
    Ok(())
}

fn restore_device<D: VhostUserDevice>(
    transport: &Mutex<VirtioTransport<D>>,
    saved: &[VhostUserDeviceState],
) -> Result<(), LoadSnapshotError> {
    let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
    let name = transport.device().queues().device().clone();
    let failed = |reason: String| LoadSnapshotError::Device(format!("{name}: {reason}"));
    let state = saved
        .iter()
        .find(|s| s.id == name.id)
        .ok_or_else(|| failed("the snapshot has no state for it".into()))?;
    transport
        .device_mut()
        .queues_mut()
        .prepare_restore(&state.queues, state.transport.is_active())
        .map_err(|e| failed(e.to_string()))?;
    transport
        .restore(&state.transport, state.pci.as_ref())
        .map_err(|e| failed(e.to_string()))
}

/// What a load or an incoming migration changes of the configuration.
pub struct Overrides<'a> {
    pub network: &'a [NetworkOverride],
    pub drives: &'a [DriveOverride],
    pub vsock: Option<&'a VsockOverride>,
}

/// A snapshot's (or a migration source's) configuration with the
/// overrides applied, each checked against it.
pub fn resources_from_config(
    config: &serde_json::Value,
    overrides: &Overrides<'_>,
) -> Result<VmResources, LoadSnapshotError> {
    let mut config = config.clone();
    // The process-level outputs are the loading process's.
    if let Some(c) = config.as_object_mut() {
        for section in ["logger", "metrics", "serial"] {
            c.remove(section);
        }
    }
    for wanted in overrides.drives {
        let drive = config["drives"]
            .as_array_mut()
            .and_then(|drives| {
                drives
                    .iter_mut()
                    .find(|d| d["drive_id"].as_str() == Some(wanted.drive_id.as_str()))
            })
            .ok_or_else(|| LoadSnapshotError::UnknownDrive(wanted.drive_id.clone()))?;
        drive["path_on_host"] = serde_json::Value::from(wanted.path_on_host.clone());
    }
    for wanted in overrides.network {
        let iface = config["network-interfaces"]
            .as_array_mut()
            .and_then(|ifaces| {
                ifaces
                    .iter_mut()
                    .find(|n| n["iface_id"].as_str() == Some(wanted.iface_id.as_str()))
            })
            .ok_or(LoadSnapshotError::UnknownNetworkDevice)?;
        iface["host_dev_name"] = serde_json::Value::from(wanted.host_dev_name.clone());
    }
    if let Some(wanted) = overrides.vsock {
        let vsock = config
            .get_mut("vsock")
            .filter(|v| v.is_object())
            .ok_or(LoadSnapshotError::UnknownVsockDevice)?;
        vsock["uds_path"] = serde_json::Value::from(wanted.uds_path.clone());
    }
    VmResources::from_snapshot_json(&config.to_string()).map_err(LoadSnapshotError::Config)
}

/// Opens the memory file and checks that it holds every region.
fn memory_file(path: &Path, regions: &[(u64, u64)]) -> Result<File, LoadSnapshotError> {
    let display = || path.display().to_string();
    let file = File::open(path).map_err(|source| LoadSnapshotError::MemoryFile {
        path: display(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| LoadSnapshotError::MemoryFile {
            path: display(),
            source,
        })?
        .len();
    let expected = regions
        .iter()
        .try_fold(0u64, |sum, &(_, len)| sum.checked_add(len))
        .unwrap_or(u64::MAX);
    if found < expected {
        return Err(LoadSnapshotError::MemoryFileSize {
            path: display(),
            expected,
            found,
        });
    }
    Ok(file)
}
