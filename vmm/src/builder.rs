//! Builds a microVM from its resources, step by step: KVM, guest memory,
//! the VM, kernel and initrd, the devices and their backends, the boot
//! information, the vCPUs and the event loop; then starts the vCPUs and
//! hands over a running [`Vmm`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::serial::{SerialInput, SerialOutput};
use devices::pseudo::BootTimer;
use devices::vhost_user::{DirtyLog, DirtyLogError, PageFaultServer, VhostUserDevice as _};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use linux_loader::loader::Cmdline;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryMmap};
use vmm_config::DEFAULT_KERNEL_CMDLINE;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::arch::boot::{self, BootError};
use crate::arch::cpu_features::CpuFeatures;
use crate::arch::cpuid::Topology;
use crate::arch::layout;
use crate::arch::regs::{self, RegsError};
use crate::device_manager::{
    self, AttachError, BackendSpawner, DeviceError, DeviceKind, LegacyDevices, Placement,
};
use crate::exit_handler::ExitHandler;
use crate::memory::{self, MemoryError};
use crate::mmds::MmdsService;
use crate::output_file::open_nonblocking_append;
use crate::resources::VmResources;
use crate::runtime::{Devices, Subscriber, TerminalGuard, Vmm};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};
use crate::ExitCode;
use std::collections::HashMap;

/// Errors building or starting a microVM.
#[derive(Debug, thiserror::Error)]
pub enum StartMicrovmError {
    #[error("no boot source is configured")]
    MissingBootSource,
    #[error("cannot open /dev/kvm: {0}; is KVM enabled and are you allowed to use it?")]
    Kvm(kvm_ioctls::Error),
    #[error("vcpu_count {wanted} is more than KVM allows on this host ({max})")]
    TooManyVcpus { wanted: u8, max: usize },
    #[error("KVM cannot report the CPUID it supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot check this host's CPU features with a scratch vCPU: {0}")]
    ScratchVcpu(kvm_ioctls::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialOutput { path: String, source: io::Error },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Device(#[from] AttachError),
    #[error(transparent)]
    Entropy(#[from] device_manager::EntropyAttachError),
    #[error("cannot set up the PCI root bus: {0}")]
    Pci(device_manager::PlaceError),
    #[error(transparent)]
    Balloon(#[from] device_manager::BalloonAttachError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the event loop: {0}")]
    EventLoop(String),
    #[error("cannot confine the VMM thread: {0}")]
    Seccomp(tessera_seccomp::SeccompError),
    #[error("cannot start the vhost-user reply watchdog: {0}")]
    Watchdog(std::io::Error),
    #[error("cannot set up the backends' dirty log: {0}")]
    DirtyLog(DirtyLogError),
    #[error("KVM cannot list the MSRs it saves: {0}")]
    MsrList(kvm_ioctls::Error),
}

impl StartMicrovmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::MissingBootSource
            | Self::TooManyVcpus { .. }
            | Self::Boot(BootError::NotAKernel { .. })
            | Self::Boot(BootError::Open { .. })
            | Self::Boot(BootError::InitrdTooBig { .. })
            | Self::Boot(BootError::Cmdline(_))
            | Self::Memory(MemoryError::MoreThanHost { .. })
            | Self::Memory(MemoryError::HugePageMultiple(_))
            | Self::Device(_) => ExitCode::BadConfiguration,
            _ => ExitCode::UnexpectedError,
        }
    }
}

/// Process-level options that are not part of the VM's configuration.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Log `Guest-boot-time` when the guest writes the boot-timer value.
    pub boot_timer: bool,
    /// `--enable-pci`: every virtio device on a PCI transport with MSI-X
    /// (otherwise on virtio-mmio), with the root bridge in ACPI, the ECAM
    /// reserved in e820 and no `pci=off` on the kernel command line.
    pub enable_pci: bool,
    /// Send the console to this file instead of stdout.
    pub serial_out: Option<PathBuf>,
    /// The vhost-user-blk backend binary (default: next to this executable).
    pub vhost_user_blk_bin: Option<PathBuf>,
    /// The vhost-user-net backend binary (default: next to this executable).
    pub vhost_user_net_bin: Option<PathBuf>,
    /// The vhost-user-vsock backend binary (default: next to this executable).
    pub vhost_user_vsock_bin: Option<PathBuf>,
    /// When the process started (wall clock and CPU time).
    pub start_wall: Instant,
    pub start_cpu: Duration,
    /// The seccomp filters of the VMM's threads ("vmm", "api", "vcpu").
    pub seccomp: Arc<tessera_seccomp::Filters>,
    /// The jailer's launcher, which starts backends for a jailed VMM.
    pub backend_launcher: Option<Arc<jailer::launch::LaunchChannel>>,
    /// Where backend sockets are created for a moment.
    pub backend_run_dir: PathBuf,
    /// `--id`, which MMDS session tokens are bound to.
    pub instance_id: String,
    /// Seals MMDS session tokens (random per process).
    pub mmds_token_key: [u8; tessera_backend_control::TOKEN_KEY_LEN],
}

fn serial_output(path: Option<&Path>) -> Result<SerialOutput, StartMicrovmError> {
    match path {
        Some(path) => {
            let file = open_nonblocking_append(path).map_err(|source| {
                StartMicrovmError::SerialOutput {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            Ok(Box::new(file))
        }
        // vm-superio flushes after every byte, so console output is never
        // held back in stdout's line buffer.
        None => Ok(Box::new(io::stdout())),
    }
}

/// Builds the microVM described by `resources` and starts its vCPUs.
pub fn build_microvm(
    resources: &VmResources,
    options: &BootOptions,
) -> Result<Vmm, StartMicrovmError> {
    let boot_source = resources
        .boot_source
        .as_ref()
        .ok_or(StartMicrovmError::MissingBootSource)?;
    let machine = &resources.machine_config;
    let kvm = open_kvm(machine.vcpu_count)?;
    let mem_size = (machine.mem_size_mib as u64) << 20;
    let guest_memory = create_guest_memory(resources, options.enable_pci)?;
    // The kernel and initrd are read into guest memory on a thread of their
    // own while KVM creates the VM: in L1 under TCG each takes 20 to 250 ms.
    // A bad image is reported before any error of the VM's.
    let (images, prepared) = std::thread::scope(|scope| {
        let load = || {
            boot::load_images(
                &guest_memory,
                mem_size,
                Path::new(&boot_source.kernel_image_path),
                boot_source.initrd_path.as_deref().map(Path::new),
            )
        };
        let loader = std::thread::Builder::new()
            .name("loader".into())
            .spawn_scoped(scope, load);
        let prepared = prepare_vm(&kvm, &guest_memory, resources, options);
        let images = match loader {
            Ok(loader) => loader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => load(),
        };
        (images, prepared)
    });
    let (kernel, initrd) = images?;
    let (vm, mut legacy) = prepared?;
    let mut cmdline = kernel_cmdline(boot_source.boot_args.as_deref(), options.enable_pci)?;

    let attached = attach_virtio_devices(
        &vm,
        &guest_memory,
        resources,
        options,
        options.enable_pci.then(Vec::new),
        &mut legacy,
        &mut cmdline,
    )?;

    boot::configure_system(
        &guest_memory,
        mem_size,
        &kernel,
        &cmdline,
        initrd,
        machine.vcpu_count,
        options.enable_pci,
    )?;
    regs::write_boot_tables(&guest_memory, kernel.entry)?;
    log::info!(
        "loaded {} ({:?}), {} vCPUs, {} MiB, {} drive(s), {} interface(s)",
        boot_source.kernel_image_path,
        kernel.entry,
        machine.vcpu_count,
        machine.mem_size_mib,
        attached.block.len(),
        attached.net.len()
    );
    let buses = (Arc::new(legacy.pio_bus), Arc::new(legacy.mmio_bus));
    let vcpus = create_vcpus(&kvm, &vm, machine, buses, kernel.entry)?;
    let guest_cpu = vcpus[0].cpu_features()?;
    let parts = Parts {
        guest_memory,
        vm,
        vcpus,
        serial: legacy.serial,
        i8042: legacy.i8042,
        reset_evt: legacy.reset_evt,
        attached,
        on_demand_memory: None,
        fresh_memory: true,
        guest_cpu,
    };
    run_microvm(parts, resources.clone(), options, false)
}

/// The VM with guest memory registered, and its legacy devices.
fn prepare_vm(
    kvm: &Kvm,
    guest_memory: &GuestMemoryMmap,
    resources: &VmResources,
    options: &BootOptions,
) -> Result<(Vm, device_manager::LegacyDevices), StartMicrovmError> {
    let vm = Vm::new(kvm)?;
    vm.register_memory(
        kvm,
        guest_memory,
        resources.machine_config.track_dirty_pages,
    )?;
    let legacy = attach_legacy_devices(&vm, resources, options)?;
    Ok((vm, legacy))
}

/// What a built or loaded microVM is made of, before its event loop.
pub(crate) struct Parts {
    pub(crate) guest_memory: GuestMemoryMmap,
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) serial: Arc<Mutex<devices::legacy::serial::SerialDevice>>,
    pub(crate) i8042: Arc<Mutex<devices::legacy::i8042::I8042>>,
    pub(crate) reset_evt: EventFd,
    pub(crate) attached: AttachedDevices,
    /// Guest memory started as zeros (a boot, a received migration): a
    /// page never touched still holds zeros. Not so for a snapshot's.
    pub(crate) fresh_memory: bool,
    /// What fills a loaded snapshot's guest memory on demand.
    pub(crate) on_demand_memory: Option<crate::snapshot::OnDemandMemory>,
    /// The CPU features the guest was shown (vCPU 0's).
    pub(crate) guest_cpu: CpuFeatures,
}

/// Sets up the event loop around `parts` and starts the vCPUs (`paused`:
/// each waits for a resume before it first runs).
pub(crate) fn run_microvm(
    parts: Parts,
    resources: VmResources,
    options: &BootOptions,
    paused: bool,
) -> Result<Vmm, StartMicrovmError> {
    let vcpu_stop_evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| event_loop_err(&e))?;
    let (stop_sender, stop_receiver) = mpsc::channel();
    let exit_handler = Arc::new(Mutex::new(ExitHandler::new(
        parts.reset_evt,
        vcpu_stop_evt.try_clone().map_err(|e| event_loop_err(&e))?,
        stop_receiver,
    )));
    let mut event_manager = EventManager::<Subscriber>::new().map_err(|e| event_loop_err(&e))?;
    event_manager.add_subscriber(exit_handler.clone());
    let dirty_log = parts.attached.dirty_log.clone();
    let devices = watch_backends(parts.attached, &mut event_manager)?;
    let terminal = serial_input(&parts.serial, &mut event_manager);

    let vcpu_handles = start_vcpus(parts.vcpus, &stop_sender, &vcpu_stop_evt, options, paused)?;
    Ok(Vmm {
        _guest_memory: parts.guest_memory,
        _vm: Arc::new(parts.vm),
        vcpus: vcpu_handles,
        i8042: parts.i8042,
        serial: parts.serial,
        devices,
        resources,
        paused,
        event_manager,
        exit_handler,
        _terminal: terminal,
        flushed_totals: Mutex::default(),
        dirty_log,
        unsaved_dirty_pages: Mutex::default(),
        _on_demand_memory: parts.on_demand_memory,
        fresh_memory: parts.fresh_memory,
        guest_cpu: parts.guest_cpu,
        migration: None,
        paused_for_migration: false,
        migrated_away: false,
        received_migration: None,
    })
}

/// Starts each vCPU's thread, which confines itself; then the VMM thread
/// confines itself too (Firecracker's order), once it needs nothing beyond
/// its runtime list.
fn start_vcpus(
    vcpus: Vec<Vcpu>,
    stop_sender: &mpsc::Sender<vcpu::VcpuStopReport>,
    vcpu_stop_evt: &EventFd,
    options: &BootOptions,
    paused: bool,
) -> Result<Vec<VcpuHandle>, StartMicrovmError> {
    vcpu::install_kick_handler()?;
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let evt = vcpu_stop_evt.try_clone().map_err(|e| event_loop_err(&e))?;
        handles.push(vcpu.start(stop_sender.clone(), evt, options.seccomp.clone(), paused)?);
    }
    options
        .seccomp
        .apply("vmm")
        .map_err(StartMicrovmError::Seccomp)?;
    Ok(handles)
}

fn event_loop_err(err: &dyn std::fmt::Debug) -> StartMicrovmError {
    StartMicrovmError::EventLoop(format!("{err:?}"))
}

/// Opens `/dev/kvm` and checks that it allows `vcpu_count` vCPUs.
pub(crate) fn open_kvm(vcpu_count: u8) -> Result<Kvm, StartMicrovmError> {
    let kvm = Kvm::new().map_err(StartMicrovmError::Kvm)?;
    let max = kvm.get_max_vcpus();
    if usize::from(vcpu_count) > max {
        return Err(StartMicrovmError::TooManyVcpus {
            wanted: vcpu_count,
            max,
        });
    }
    Ok(kvm)
}

/// Whether the microVM has devices whose backends run in other processes.
pub(crate) fn has_backends(resources: &VmResources) -> bool {
    !resources.drives.is_empty()
        || !resources.network_interfaces.is_empty()
        || resources.vsock.is_some()
}

/// Guest RAM: shared (a memfd) only when backends have to map it, now or
/// (`hotplug`, with `--enable-pci`) after boot.
pub(crate) fn create_guest_memory(
    resources: &VmResources,
    hotplug: bool,
) -> Result<GuestMemoryMmap, StartMicrovmError> {
    let machine = &resources.machine_config;
    let sharing = if has_backends(resources) || hotplug {
        memory::Sharing::Shared
    } else {
        memory::Sharing::Private
    };
    Ok(memory::create_guest_memory(
        machine.mem_size_mib,
        machine.huge_pages,
        sharing,
    )?)
}

/// The serial port, the i8042 and the boot timer.
pub(crate) fn attach_legacy_devices(
    vm: &Vm,
    resources: &VmResources,
    options: &BootOptions,
) -> Result<device_manager::LegacyDevices, StartMicrovmError> {
    // PUT /serial (or the config file's "serial") wins over --serial-out.
    let serial_path = resources
        .serial
        .as_ref()
        .and_then(|serial| serial.serial_out_path.as_ref().map(PathBuf::from))
        .or_else(|| options.serial_out.clone());
    let boot_timer = options
        .boot_timer
        .then(|| BootTimer::new(options.start_wall, options.start_cpu));
    Ok(device_manager::attach_legacy_devices(
        vm,
        serial_output(serial_path.as_deref())?,
        boot_timer,
    )?)
}

/// The vhost-user devices, each with what brings it a new backend.
#[derive(Default)]
pub(crate) struct AttachedDevices {
    pub(crate) block: Vec<(device_manager::BlockTransport, device_manager::Connector)>,
    pub(crate) block_spawner: Option<BackendSpawner>,
    pub(crate) net: Vec<(device_manager::NetTransport, device_manager::Connector)>,
    pub(crate) vsock: Option<(device_manager::VsockTransport, device_manager::Connector)>,
    /// The entropy device, which the VMM serves itself.
    pub(crate) entropy: Option<device_manager::EntropyTransport>,
    /// The balloon device, which the VMM serves itself.
    pub(crate) balloon: Option<device_manager::BalloonTransport>,
    /// The log their backends mark the pages they write in, while the
    /// microVM tracks dirty pages (`track_dirty_pages`).
    pub(crate) dirty_log: Option<Arc<DirtyLog>>,
    /// How the interfaces serve MMDS, if any does.
    pub(crate) mmds: Option<MmdsService>,
    /// The PCI root bus, with `--enable-pci`.
    pub(crate) pci: Option<device_manager::PciBus>,
    /// Starts the interfaces' backends (kept for hot-plug).
    pub(crate) net_spawner: Option<BackendSpawner>,
}

impl AttachedDevices {
    /// Runs `f` on every device's queues: drives, interfaces, vsock.
    fn for_each_queues(&self, mut f: impl FnMut(&mut devices::vhost_user::VhostUserQueues)) {
        for (transport, _) in &self.block {
            f(lock(transport).device_mut().queues_mut());
        }
        for (transport, _) in &self.net {
            f(lock(transport).device_mut().queues_mut());
        }
        if let Some((transport, _)) = &self.vsock {
            f(lock(transport).device_mut().queues_mut());
        }
    }

    /// Has every device's backend report the faults of its mappings of
    /// guest memory to `server` (a loaded snapshot filled on demand).
    pub(crate) fn share_page_fault_server(&self, server: &Arc<dyn PageFaultServer>) {
        self.for_each_queues(|queues| queues.set_page_fault_server(server.clone()));
    }

    /// Has every device's backend (and the VMM's own entropy device) log
    /// the pages it writes in `log`.
    fn share_dirty_log(&self, log: &Arc<DirtyLog>) {
        self.for_each_queues(|queues| queues.set_dirty_log(log.clone()));
        if let Some(entropy) = &self.entropy {
            lock(entropy).device_mut().set_dirty_log(log.clone());
        }
        if let Some(balloon) = &self.balloon {
            lock(balloon).device_mut().set_dirty_log(log.clone());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts (or connects to) each device's backend and places the drives,
/// the interfaces, the vsock, entropy and balloon devices, in that order,
/// on virtio-mmio or (`pci`) on a PCI root bus put on `legacy`'s buses,
/// the devices taking the slots `pci` lists (a snapshot's), then the
/// lowest free ones.
pub(crate) fn attach_virtio_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    resources: &VmResources,
    options: &BootOptions,
    pci: Option<Vec<u8>>,
    legacy: &mut LegacyDevices,
    cmdline: &mut Cmdline,
) -> Result<AttachedDevices, StartMicrovmError> {
    let planned_slots = pci.clone().unwrap_or_default();
    let pci = if pci.is_some() {
        let router = vm.msi_router();
        let bus =
            device_manager::attach_pci_root(vm, &mut legacy.pio_bus, &mut legacy.mmio_bus, router)
                .map_err(StartMicrovmError::Pci)?;
        Some(bus)
    } else {
        None
    };
    let mut placement = Placement::new(vm, &mut legacy.mmio_bus, cmdline, pci.clone())
        .with_planned_slots(planned_slots);
    let placement = &mut placement;
    if has_backends(resources) || pci.is_some() {
        let filters = options.seccomp.clone();
        devices::vhost_user::watchdog::start(move || {
            filters.apply("vmm").map_err(|err| err.to_string())
        })
        .map_err(StartMicrovmError::Watchdog)?;
    }
    // With PCI, drives and interfaces may be hot-plugged: their backends'
    // starters are made now, before the VMM thread is confined.
    let mut block_spawner = None;
    if resources.drives.is_empty() && pci.is_some() {
        let binary = options.vhost_user_blk_bin.as_ref();
        block_spawner = Some(device_manager::spawner(DeviceKind::Drive, binary, options)?);
    }
    let mut net_spawner = match (resources.network_interfaces.is_empty(), &pci) {
        (true, Some(_)) => Some(device_manager::spawner(
            DeviceKind::Interface,
            options.vhost_user_net_bin.as_ref(),
            options,
        )?),
        _ => None,
    };
    let block = if resources.drives.is_empty() {
        Vec::new()
    } else {
        let spawner = device_manager::spawner(
            DeviceKind::Drive,
            options.vhost_user_blk_bin.as_ref(),
            options,
        )?;
        let vcpus = u64::from(resources.machine_config.vcpu_count);
        device_manager::attach_block_devices(mem, &resources.drives, &spawner, vcpus, placement)
            .inspect(|_| block_spawner = Some(spawner))?
    };
    let mut mmds = resources
        .mmds_config
        .as_ref()
        .filter(|config| !config.network_interfaces.is_empty())
        .map(|config| MmdsService::new(config, options.mmds_token_key, &options.instance_id));
    let net = if resources.network_interfaces.is_empty() {
        Vec::new()
    } else {
        let spawner = device_manager::spawner(
            DeviceKind::Interface,
            options.vhost_user_net_bin.as_ref(),
            options,
        )?;
        let mmds = mmds.as_mut().map(|service| {
            let store = service.store_messages(&resources.mmds);
            (&*service, store)
        });
        device_manager::attach_net_devices(
            mem,
            device_manager::Interfaces {
                configs: &resources.network_interfaces,
                mmds: mmds
                    .as_ref()
                    .map(|(service, store)| (*service, store.as_slice())),
            },
            &spawner,
            placement,
        )
        .inspect(|_| net_spawner = Some(spawner))?
    };
    let vsock = match &resources.vsock {
        None => None,
        Some(vsock) => {
            let spawner = device_manager::spawner(
                DeviceKind::Vsock,
                options.vhost_user_vsock_bin.as_ref(),
                options,
            )?;
            Some(device_manager::attach_vsock_device(
                mem, vsock, &spawner, placement,
            )?)
        }
    };
    let entropy = match &resources.entropy {
        None => None,
        Some(config) => Some(device_manager::attach_entropy_device(
            mem, config, placement,
        )?),
    };
    let balloon = match &resources.balloon {
        None => None,
        Some(config) => Some(device_manager::attach_balloon_device(
            mem,
            config,
            resources.machine_config.mem_size_mib,
            placement,
        )?),
    };
    let mut attached = AttachedDevices {
        block,
        block_spawner,
        net,
        vsock,
        entropy,
        balloon,
        dirty_log: None,
        mmds,
        pci,
        net_spawner,
    };
    let devices_to_log =
        has_backends(resources) || attached.entropy.is_some() || attached.balloon.is_some();
    if devices_to_log || attached.pci.is_some() {
        // Made now, while the VMM may still create memfds: without
        // track_dirty_pages a migration has the devices use it later.
        let mem_end = mem.last_addr().0 + 1;
        let log = Arc::new(DirtyLog::new(mem_end).map_err(StartMicrovmError::DirtyLog)?);
        if resources.machine_config.track_dirty_pages {
            attached.share_dirty_log(&log);
        }
        attached.dirty_log = Some(log);
    }
    Ok(attached)
}

/// One configured vCPU per `vcpu_count`, on the two buses.
fn create_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    machine: &vmm_config::MachineConfig,
    (pio_bus, mmio_bus): (Arc<devices::Bus>, Arc<devices::Bus>),
    entry: regs::EntryPoint,
) -> Result<Vec<Vcpu>, StartMicrovmError> {
    let supported_cpuid = guest_cpuid_base(kvm)?;
    let msr_list = saveable_msrs(kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(machine.vcpu_count));
    for index in 0..machine.vcpu_count {
        let buses = (pio_bus.clone(), mmio_bus.clone());
        let vcpu = Vcpu::new(vm.fd(), index, buses, msr_list.clone())?;
        vcpu.configure(&supported_cpuid, topology(machine, index), entry)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

fn topology(machine: &vmm_config::MachineConfig, cpu_index: u8) -> Topology {
    Topology {
        cpu_index,
        cpu_count: machine.vcpu_count,
        threads_per_core: machine.threads_per_core(),
    }
}

/// KVM's supported CPUID with what every vCPU is told besides.
fn guest_cpuid_base(kvm: &Kvm) -> Result<CpuId, StartMicrovmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(StartMicrovmError::SupportedCpuid)?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        crate::arch::cpuid::announce_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
}

/// The CPU features a booted vCPU 0 of `machine` gets on this host: what
/// a scratch vCPU given its CPUID reports back, as a booted one does (an
/// emulating KVM such as kvm_pvm shows the guest more than its supported
/// set).
pub(crate) fn host_cpu_features(
    kvm: &Kvm,
    machine: &vmm_config::MachineConfig,
) -> Result<CpuFeatures, StartMicrovmError> {
    let mut cpuid = guest_cpuid_base(kvm)?;
    crate::arch::cpuid::normalize(&mut cpuid, topology(machine, 0))
        .map_err(|source| VcpuError::Cpuid { index: 0, source })?;
    let scratch = kvm.create_vm().map_err(StartMicrovmError::ScratchVcpu)?;
    let vcpu = scratch
        .create_vcpu(0)
        .map_err(StartMicrovmError::ScratchVcpu)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(StartMicrovmError::ScratchVcpu)?;
    let seen = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(StartMicrovmError::ScratchVcpu)?;
    Ok(CpuFeatures::of(seen.as_slice()))
}

/// The MSRs KVM can save and restore, for snapshots.
pub(crate) fn saveable_msrs(kvm: &Kvm) -> Result<Arc<Vec<u32>>, StartMicrovmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(StartMicrovmError::MsrList)?;
    Ok(Arc::new(list.as_slice().to_vec()))
}

/// Has the event loop watch each device's backend (and a network device's
/// control queue), bringing in a new backend when one is gone.
fn watch_backends(
    attached: AttachedDevices,
    event_manager: &mut EventManager<Subscriber>,
) -> Result<Devices, StartMicrovmError> {
    let mut monitors = HashMap::new();
    let mut block = Vec::new();
    for (transport, connect) in attached.block {
        let key = lock(&transport).device().queues().device().clone();
        let monitor = device_manager::BackendMonitor::new(transport.clone(), connect);
        monitors.insert(key, event_manager.add_subscriber(subscriber(monitor)?));
        block.push(transport);
    }
    let mut net = Vec::new();
    for (transport, connect) in attached.net {
        let key = lock(&transport).device().queues().device().clone();
        let monitor = device_manager::NetBackendMonitor::new(transport.clone(), connect);
        monitors.insert(key, event_manager.add_subscriber(subscriber(monitor)?));
        net.push(transport);
    }
    let mut vsock = None;
    if let Some((transport, connect)) = attached.vsock {
        let monitor = device_manager::VsockBackendMonitor::new(transport.clone(), connect);
        event_manager.add_subscriber(subscriber(monitor)?);
        vsock = Some(transport);
    }
    if let Some(transport) = &attached.entropy {
        let monitor = device_manager::EntropyMonitor::new(transport.clone());
        event_manager.add_subscriber(Arc::new(Mutex::new(monitor)));
    }
    if let Some(transport) = &attached.balloon {
        let monitor = device_manager::BalloonMonitor::new(transport.clone());
        event_manager.add_subscriber(Arc::new(Mutex::new(monitor)));
    }
    Ok(Devices {
        entropy: attached.entropy,
        balloon: attached.balloon,
        block,
        block_spawner: attached.block_spawner,
        net_spawner: attached.net_spawner,
        net,
        vsock,
        mmds: attached.mmds,
        pci: attached.pci,
        monitors,
    })
}

/// A backend monitor, for the event loop.
fn subscriber<T: MutEventSubscriber + Send + 'static>(
    monitor: std::io::Result<T>,
) -> Result<Subscriber, StartMicrovmError> {
    let monitor = monitor.map_err(|e| event_loop_err(&e))?;
    Ok(Arc::new(Mutex::new(monitor)))
}

/// Sends the host's terminal (stdin in raw mode) to the guest's serial
/// port, when stdin is a terminal; the guard restores it at exit.
fn serial_input(
    serial: &Arc<Mutex<devices::legacy::serial::SerialDevice>>,
    event_manager: &mut EventManager<Subscriber>,
) -> Option<TerminalGuard> {
    let terminal = TerminalGuard::raw_stdin()?;
    let stdin = io::stdin();
    if let Err(err) = stdin.lock().set_non_block(true) {
        log::warn!("serial input disabled: cannot make stdin non-blocking: {err}");
    } else {
        let input = SerialInput::new(serial.clone(), stdin);
        event_manager.add_subscriber(Arc::new(Mutex::new(input)));
    }
    Some(terminal)
}

/// The guest kernel's command line: the boot source's `boot_args`
/// (Firecracker's default without them), and what it needs to know of the
/// PCI bus.
///
/// - Without PCI (`pci` false), `pci=off` is appended unless the arguments
///   carry a `pci=` of their own: there is no PCI bus, and a kernel built
///   with PCI (to run under QEMU as well) would probe the config-space ports
///   for nothing.
/// - With PCI, nothing is appended and the default's `pci=off` is left
///   out. A `pci=off` in the user's own `boot_args` stays (it is theirs),
///   with a warning: that guest will find none of its virtio devices.
fn kernel_cmdline(boot_args: Option<&str>, pci: bool) -> Result<Cmdline, BootError> {
    let args = match boot_args {
        Some(args) => {
            if pci && disables_pci(args) {
                log::warn!(
                    "boot_args contain pci=off, but with --enable-pci every virtio device is on \
                     PCI: the guest will find none of them"
                );
            }
            args.to_string()
        }
        None if pci => DEFAULT_KERNEL_CMDLINE
            .split_whitespace()
            .filter(|arg| *arg != "pci=off")
            .collect::<Vec<_>>()
            .join(" "),
        None => DEFAULT_KERNEL_CMDLINE.to_string(),
    };
    let mut cmdline =
        Cmdline::try_from(&args, layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !pci && !args.split_whitespace().any(|arg| arg.starts_with("pci=")) {
        cmdline.insert("pci", "off").map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Whether a command line turns the kernel's PCI support off: a `pci=`
/// whose comma-separated options include `off`.
fn disables_pci(args: &str) -> bool {
    args.split_whitespace()
        .filter_map(|arg| arg.strip_prefix("pci="))
        .any(|options| options.split(',').any(|option| option == "off"))
}

#[cfg(test)]
mod tests {
    use super::{disables_pci, kernel_cmdline, DEFAULT_KERNEL_CMDLINE};

    fn line(args: Option<&str>, pci: bool) -> String {
        let cmdline = kernel_cmdline(args, pci).unwrap();
        cmdline.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn the_kernel_is_told_there_is_no_pci_unless_the_user_says_otherwise() {
        let line = |args: &str| line(Some(args), false);
        assert_eq!(line("console=ttyS0"), "console=ttyS0 pci=off");
        assert_eq!(line("console=ttyS0 pci=off"), "console=ttyS0 pci=off");
        assert_eq!(line("pci=nomsi"), "pci=nomsi");
    }

    #[test]
    fn without_pci_the_default_command_line_is_unchanged() {
        assert_eq!(line(None, false), DEFAULT_KERNEL_CMDLINE);
        assert_eq!(line(None, false).matches("pci=off").count(), 1);
    }

    #[test]
    fn with_pci_no_pci_off_is_added_and_the_default_loses_its_own() {
        assert_eq!(line(Some("console=ttyS0"), true), "console=ttyS0");
        assert_eq!(line(Some("pci=nomsi"), true), "pci=nomsi");
        let default = line(None, true);
        assert!(!default.contains("pci"), "{default}");
        // The rest of the default stays, in order.
        assert_eq!(
            default,
            DEFAULT_KERNEL_CMDLINE.replace(" pci=off", ""),
            "{default}"
        );
    }

    #[test]
    fn with_pci_the_users_own_pci_off_is_kept_and_warned_about() {
        assert_eq!(
            line(Some("console=ttyS0 pci=off"), true),
            "console=ttyS0 pci=off"
        );
        assert!(disables_pci("console=ttyS0 pci=off"));
        assert!(disables_pci("pci=nomsi,off"));
        assert!(!disables_pci("pci=nomsi"));
        assert!(!disables_pci("console=ttyS0 nopci=off"));
    }
}
