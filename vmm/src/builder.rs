//! Builds a microVM from its resources and runs it: memory, KVM VM, kernel,
//! boot information, devices, vCPUs and the main event loop.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::i8042::{I8042Error, I8042};
use devices::legacy::serial::{SerialDevice, SerialInput, SerialOutput};
use devices::pseudo::BootTimer;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::arch::boot::{self, BootError};
use crate::arch::cpuid::Topology;
use crate::arch::layout;
use crate::arch::regs::{self, RegsError};
use crate::device_manager::{self, AttachError, BackendSpawner, DeviceError, DeviceKind};
use crate::exit_handler::ExitHandler;
use crate::memory::{self, MemoryError};
use crate::metrics::DeviceCounters;
use crate::output_file::open_nonblocking_append;
use crate::resources::VmResources;
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuEvent, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};
use crate::ExitCode;
use api_server::config::BlockDeviceUpdate;
use devices::vhost_user::VhostUserDevice;
use devices::virtio::MmioTransport;
use nix::sys::stat::SFlag;

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
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the event loop: {0}")]
    EventLoop(String),
    #[error("cannot confine the VMM thread: {0}")]
    Seccomp(tessera_seccomp::SeccompError),
    #[error("cannot start the vhost-user reply watchdog: {0}")]
    Watchdog(std::io::Error),
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
}

/// An event-loop subscriber.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a vCPU may take to acknowledge a pause or resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors controlling a running microVM.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the microVM is already {0}")]
    AlreadyInState(&'static str),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    I8042(#[from] I8042Error),
    #[error(transparent)]
    Resources(#[from] crate::resources::ResourcesError),
    #[error("drive {id}: cannot open {path}: {source}")]
    OpenDisk {
        id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("drive {id}: {path} is not a regular file or a block device")]
    NotADisk { id: String, path: String },
    #[error("drive {0}: its device was given up; it takes no new file")]
    DriveGivenUp(String),
}

/// A running microVM. Its vCPUs are stopped before the guest memory and
/// the VM go (see the `Drop` impl).
pub struct Vmm {
    // Guest memory must outlive the VM's memory slots and the vCPU threads.
    _guest_memory: GuestMemoryMmap,
    _vm: Vm,
    vcpus: Vec<VcpuHandle>,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    block_devices: Vec<device_manager::BlockTransport>,
    /// Starts the drives' backends (kept for a drive's new file).
    block_spawner: Option<BackendSpawner>,
    net_devices: Vec<device_manager::NetTransport>,
    vsock_device: Option<device_manager::VsockTransport>,
    resources: VmResources,
    paused: bool,
    event_manager: EventManager<Subscriber>,
    exit_handler: Arc<Mutex<ExitHandler>>,
    _terminal: Option<TerminalGuard>,
}

impl Vmm {
    /// Runs the event loop until the guest ends and returns the exit code.
    /// `after_events` runs after every batch of events, with the VMM at
    /// hand: the API and periodic work hook in there.
    pub fn run(&mut self, mut after_events: impl FnMut(&mut Vmm)) -> ExitCode {
        loop {
            if let Err(err) = self.event_manager.run() {
                log::error!("the event loop failed: {err:?}");
                return ExitCode::GenericError;
            }
            let code = self
                .exit_handler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .exit_code();
            if let Some(code) = code {
                self.stop_vcpus();
                return code;
            }
            after_events(self);
        }
    }

    /// Takes every vCPU out of the guest for good and joins its thread.
    fn stop_vcpus(&mut self) {
        for vcpu in self.vcpus.drain(..) {
            if let Err(err) = vcpu.stop(VCPU_ACK_TIMEOUT) {
                log::error!("{err}");
            }
        }
    }

    /// Adds an event-loop subscriber.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.event_manager.add_subscriber(subscriber);
    }

    /// The resources the microVM was built from.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU; it returns once all of them are out of the guest.
    pub fn pause(&mut self) -> Result<(), RuntimeError> {
        if self.paused {
            return Err(RuntimeError::AlreadyInState("paused"));
        }
        for vcpu in &self.vcpus {
            vcpu.request(VcpuEvent::Pause, VCPU_ACK_TIMEOUT)?;
        }
        self.paused = true;
        log::info!("the microVM is paused");
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), RuntimeError> {
        if !self.paused {
            return Err(RuntimeError::AlreadyInState("running"));
        }
        for vcpu in &self.vcpus {
            vcpu.request(VcpuEvent::Resume, VCPU_ACK_TIMEOUT)?;
        }
        self.paused = false;
        log::info!("the microVM is resumed");
        Ok(())
    }

    /// `PATCH /drives/{id}` on the running microVM. A new `path_on_host`
    /// is opened here (inside the VMM's jail, if jailed), becomes the disk
    /// the drive's backends get, and the current backend is hung up on: the
    /// backend monitor brings in a new one on the new file, which takes
    /// over the queues (requests in flight included) and, if the capacity
    /// changed, the guest gets a configuration change interrupt, as with
    /// Firecracker.
    pub fn update_drive(&mut self, update: &BlockDeviceUpdate) -> Result<(), RuntimeError> {
        let Some(path) = self.resources.check_running_drive_update(update)? else {
            return Ok(());
        };
        let id = &update.drive_id;
        let read_only = self
            .resources
            .drives
            .iter()
            .find(|d| &d.drive_id == id)
            .and_then(|d| d.is_read_only)
            .unwrap_or(false);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| RuntimeError::OpenDisk {
                id: id.clone(),
                path: path.to_string(),
                source,
            })?;
        let kind = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&file))
            .map(|stat| SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()))
            .map_err(|errno| RuntimeError::OpenDisk {
                id: id.clone(),
                path: path.to_string(),
                source: errno.into(),
            })?;
        if kind != SFlag::S_IFREG && kind != SFlag::S_IFBLK {
            return Err(RuntimeError::NotADisk {
                id: id.clone(),
                path: path.to_string(),
            });
        }
        let transport = self
            .block_devices
            .iter()
            .find(|t| lock(t).device().id() == id)
            .ok_or_else(|| crate::resources::ResourcesError::UnknownDrive(id.clone()))?;
        let transport = lock(transport);
        if transport.device().is_given_up() {
            return Err(RuntimeError::DriveGivenUp(id.clone()));
        }
        if let Some(spawner) = &self.block_spawner {
            spawner.replace_disk(id, file);
        }
        transport.device().queues().hang_up();
        drop(transport);
        self.resources.set_running_drive_path(id, path);
        log::info!("drive {id}: now backed by {path}; replacing its backend");
        Ok(())
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), RuntimeError> {
        lock(&self.i8042).send_ctrl_alt_del()?;
        Ok(())
    }

    /// Per-device metrics for a flush.
    pub fn device_metrics(&self) -> DeviceCounters {
        let c = lock(&self.i8042).counters();
        let mut counters = vec![
            (
                "i8042".to_string(),
                serde_json::json!({
                    "reset_count": c.reset_count,
                    "read_count": c.read_count,
                    "write_count": c.write_count,
                    "missed_read_count": c.missed_read_count,
                    "missed_write_count": c.missed_write_count,
                }),
            ),
            (
                "uart".to_string(),
                serde_json::json!({"missed_write_count": lock(&self.serial).missed_writes()}),
            ),
        ];
        for transport in &self.block_devices {
            let transport = lock(transport);
            let key = format!("block_{}", transport.device().id());
            counters.push((key, vhost_user_metrics(&transport)));
        }
        for transport in &self.net_devices {
            let transport = lock(transport);
            let key = format!("net_{}", transport.device().id());
            counters.push((key, vhost_user_metrics(&transport)));
        }
        if let Some(transport) = &self.vsock_device {
            counters.push(("vsock".to_string(), vhost_user_metrics(&lock(transport))));
        }
        counters
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

/// One vhost-user device's metrics: the transport's and the frontend's
/// counters, and those its backends keep in the stats page.
fn vhost_user_metrics<D: VhostUserDevice>(transport: &MmioTransport<D>) -> serde_json::Value {
    let queues = transport.device().queues();
    let c = queues.counters();
    let mut metrics = serde_json::json!({
        "invalid_mmio_accesses": transport.invalid_accesses(),
        "activate_fails": c.activate_fails,
        "cfg_fails": c.cfg_fails,
        "activate_time_us": c.activate_time_us,
        "backend_lost_count": c.backend_lost_count,
        "backend_reconnect_count": c.backend_reconnect_count,
    });
    if let serde_json::Value::Object(map) = &mut metrics {
        for (key, delta) in queues.backend_counters() {
            map.insert(key.to_string(), delta.into());
        }
    }
    metrics
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts the host terminal in raw mode for the guest console and restores
/// canonical mode when the VMM ends.
struct TerminalGuard;

impl TerminalGuard {
    fn raw_stdin() -> Option<Self> {
        let stdin = io::stdin();
        if !std::io::IsTerminal::is_terminal(&stdin) {
            return None;
        }
        if let Err(err) = stdin.lock().set_raw_mode() {
            log::warn!("cannot put the terminal in raw mode: {err}");
            return None;
        }
        Some(Self)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Err(err) = io::stdin().lock().set_canon_mode() {
            log::warn!("cannot restore the terminal: {err}");
        }
    }
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

    let kvm = Kvm::new().map_err(StartMicrovmError::Kvm)?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(machine.vcpu_count) > max_vcpus {
        return Err(StartMicrovmError::TooManyVcpus {
            wanted: machine.vcpu_count,
            max: max_vcpus,
        });
    }
    let mem_size = (machine.mem_size_mib as u64) << 20;
    // Backends map guest RAM only when there are devices for them.
    let sharing = if resources.drives.is_empty()
        && resources.network_interfaces.is_empty()
        && resources.vsock.is_none()
    {
        memory::Sharing::Private
    } else {
        memory::Sharing::Shared
    };
    let guest_memory =
        memory::create_guest_memory(machine.mem_size_mib, machine.huge_pages, sharing)?;
    let vm = Vm::new(&kvm)?;
    vm.register_memory(&kvm, &guest_memory, machine.track_dirty_pages)?;

    let kernel = boot::load_kernel(&guest_memory, Path::new(&boot_source.kernel_image_path))?;
    let initrd = boot_source
        .initrd_path
        .as_ref()
        .map(|path| {
            boot::load_initrd(
                &guest_memory,
                mem_size,
                Path::new(path),
                kernel.kernel_end,
                boot::initrd_addr_limit(&kernel),
            )
        })
        .transpose()?;
    let mut cmdline = kernel_cmdline(boot_source.cmdline())?;

    // PUT /serial (or the config file's "serial") wins over --serial-out.
    let serial_path = resources
        .serial
        .as_ref()
        .and_then(|serial| serial.serial_out_path.as_ref().map(PathBuf::from))
        .or_else(|| options.serial_out.clone());
    let boot_timer = options
        .boot_timer
        .then(|| BootTimer::new(options.start_wall, options.start_cpu));
    let mut legacy = device_manager::attach_legacy_devices(
        &vm,
        serial_output(serial_path.as_deref())?,
        boot_timer,
    )?;
    let has_backends = !resources.drives.is_empty()
        || !resources.network_interfaces.is_empty()
        || resources.vsock.is_some();
    if has_backends {
        let filters = options.seccomp.clone();
        devices::vhost_user::watchdog::start(move || {
            filters.apply("vmm").map_err(|err| err.to_string())
        })
        .map_err(StartMicrovmError::Watchdog)?;
    }
    let mut block_spawner = None;
    let block_devices = if resources.drives.is_empty() {
        Vec::new()
    } else {
        let spawner = device_manager::spawner(
            DeviceKind::Drive,
            options.vhost_user_blk_bin.as_ref(),
            options,
        )?;
        device_manager::attach_block_devices(
            &vm,
            &guest_memory,
            &resources.drives,
            &spawner,
            u64::from(machine.vcpu_count),
            &mut legacy.mmio_bus,
            &mut cmdline,
        )
        .inspect(|_| block_spawner = Some(spawner))?
    };
    let net_devices = if resources.network_interfaces.is_empty() {
        Vec::new()
    } else {
        let spawner = device_manager::spawner(
            DeviceKind::Interface,
            options.vhost_user_net_bin.as_ref(),
            options,
        )?;
        device_manager::attach_net_devices(
            &vm,
            &guest_memory,
            &resources.network_interfaces,
            &spawner,
            block_devices.len(),
            &mut legacy.mmio_bus,
            &mut cmdline,
        )?
    };
    let vsock_device = match &resources.vsock {
        None => None,
        Some(vsock) => {
            let spawner = device_manager::spawner(
                DeviceKind::Vsock,
                options.vhost_user_vsock_bin.as_ref(),
                options,
            )?;
            Some(device_manager::attach_vsock_device(
                &vm,
                &guest_memory,
                vsock,
                &spawner,
                block_devices.len() + net_devices.len(),
                &mut legacy.mmio_bus,
                &mut cmdline,
            )?)
        }
    };

    boot::configure_system(
        &guest_memory,
        mem_size,
        &kernel,
        &cmdline,
        initrd,
        machine.vcpu_count,
    )?;
    regs::write_boot_tables(&guest_memory, kernel.entry)?;
    log::info!(
        "loaded {} ({:?}), {} vCPUs, {} MiB, {} drive(s), {} interface(s)",
        boot_source.kernel_image_path,
        kernel.entry,
        machine.vcpu_count,
        machine.mem_size_mib,
        block_devices.len(),
        net_devices.len()
    );
    let pio_bus = Arc::new(legacy.pio_bus);
    let mmio_bus = Arc::new(legacy.mmio_bus);

    let mut supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(StartMicrovmError::SupportedCpuid)?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        crate::arch::cpuid::announce_tsc_deadline(&mut supported_cpuid);
    }
    let mut vcpus = Vec::with_capacity(usize::from(machine.vcpu_count));
    for index in 0..machine.vcpu_count {
        let vcpu = Vcpu::new(vm.fd(), index, pio_bus.clone(), mmio_bus.clone())?;
        let topology = Topology {
            cpu_index: index,
            cpu_count: machine.vcpu_count,
            threads_per_core: machine.threads_per_core(),
        };
        vcpu.configure(&supported_cpuid, topology, kernel.entry)?;
        vcpus.push(vcpu);
    }

    let event_loop_err =
        |err: &dyn std::fmt::Debug| StartMicrovmError::EventLoop(format!("{err:?}"));
    let mut event_manager = EventManager::<Subscriber>::new().map_err(|e| event_loop_err(&e))?;
    let vcpu_stop_evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| event_loop_err(&e))?;
    let (stop_sender, stop_receiver) = mpsc::channel();
    let exit_handler = Arc::new(Mutex::new(ExitHandler::new(
        legacy.reset_evt,
        vcpu_stop_evt.try_clone().map_err(|e| event_loop_err(&e))?,
        stop_receiver,
    )));
    event_manager.add_subscriber(exit_handler.clone());
    let (block_devices, block_connectors): (Vec<_>, Vec<_>) = block_devices.into_iter().unzip();
    for (transport, connect) in block_devices.iter().zip(block_connectors) {
        let monitor = device_manager::BackendMonitor::new(transport.clone(), connect)
            .map_err(|e| event_loop_err(&e))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(monitor)));
    }
    let (net_devices, net_connectors): (Vec<_>, Vec<_>) = net_devices.into_iter().unzip();
    for (transport, connect) in net_devices.iter().zip(net_connectors) {
        let monitor = device_manager::NetBackendMonitor::new(transport.clone(), connect)
            .map_err(|e| event_loop_err(&e))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(monitor)));
    }
    let vsock_device = match vsock_device {
        None => None,
        Some((transport, connect)) => {
            let monitor = device_manager::VsockBackendMonitor::new(transport.clone(), connect)
                .map_err(|e| event_loop_err(&e))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(monitor)));
            Some(transport)
        }
    };

    let terminal = TerminalGuard::raw_stdin();
    if terminal.is_some() {
        let stdin = io::stdin();
        if let Err(err) = stdin.lock().set_non_block(true) {
            log::warn!("serial input disabled: cannot make stdin non-blocking: {err}");
        } else {
            let input = SerialInput::new(legacy.serial.clone(), stdin);
            event_manager.add_subscriber(Arc::new(Mutex::new(input)));
        }
    }

    vcpu::install_kick_handler()?;
    let mut vcpu_handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let evt = vcpu_stop_evt.try_clone().map_err(|e| event_loop_err(&e))?;
        vcpu_handles.push(vcpu.start(stop_sender.clone(), evt, options.seccomp.clone())?);
    }
    // Firecracker's order: the vCPU threads confine themselves, then the
    // VMM thread does, once it needs nothing beyond its runtime list.
    options
        .seccomp
        .apply("vmm")
        .map_err(StartMicrovmError::Seccomp)?;

    Ok(Vmm {
        _guest_memory: guest_memory,
        _vm: vm,
        vcpus: vcpu_handles,
        i8042: legacy.i8042,
        serial: legacy.serial,
        block_devices,
        block_spawner,
        net_devices,
        vsock_device,
        resources: resources.clone(),
        paused: false,
        event_manager,
        exit_handler,
        _terminal: terminal,
    })
}

/// The guest kernel's command line: the boot source's, plus `pci=off`
/// unless it says otherwise. There is no PCI bus, and a kernel built with
/// PCI (to run under QEMU as well) would probe the config-space ports for
/// nothing.
fn kernel_cmdline(args: &str) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::try_from(args, layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !args.split_whitespace().any(|arg| arg.starts_with("pci=")) {
        cmdline.insert("pci", "off").map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::kernel_cmdline;

    #[test]
    fn the_kernel_is_told_there_is_no_pci_unless_the_user_says_otherwise() {
        let line = |args: &str| {
            let cmdline = kernel_cmdline(args).unwrap();
            cmdline.as_cstring().unwrap().into_string().unwrap()
        };
        assert_eq!(line("console=ttyS0"), "console=ttyS0 pci=off");
        assert_eq!(line("console=ttyS0 pci=off"), "console=ttyS0 pci=off");
        assert_eq!(line("pci=nomsi"), "pci=nomsi");
    }
}
