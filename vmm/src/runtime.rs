//! The running microVM: its vCPUs, devices and event loop, and what the
//! API does to it after boot (pause, resume, a drive's new file,
//! Ctrl+Alt+Del, the per-device metrics).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::i8042::{I8042Error, I8042};
use devices::legacy::serial::SerialDevice;
use devices::vhost_user::{DeviceName, DirtyLog, VhostUserDevice};
use devices::virtio::VirtioTransport;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use nix::sys::stat::SFlag;
use vm_memory::GuestMemoryMmap;
use vmm_config::{BlockDeviceUpdate, CreateSnapshotParams, NetworkInterfaceUpdate, SnapshotType};
use vmm_sys_util::terminal::Terminal;

use tessera_rate_limiter::RateLimiterConfig;

use crate::arch::cpu_features::CpuFeatures;
use crate::device_manager::{
    self, drive_limits_message, interface_limits_messages, BackendSpawner,
};
use crate::exit_handler::ExitHandler;
use crate::metrics::DeviceCounters;
use crate::resources::VmResources;
use crate::snapshot::dirty::{self, DirtyPages};
use crate::snapshot::{self, CreateSnapshotError, MicrovmState, VhostUserDeviceState};
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle};
use crate::vstate::vm::Vm;
use crate::ExitCode;

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
    #[error("drive {id}: its backend did not take the rate limits: {reason}")]
    DriveLimits { id: String, reason: String },
    #[error("network interface {id}: its backend did not take the rate limits: {reason}")]
    InterfaceLimits { id: String, reason: String },
}

/// A running microVM. Its vCPUs are stopped before the guest memory and
/// the VM go (see the `Drop` impl).
pub struct Vmm {
    // Guest memory must outlive the VM's memory slots and the vCPU threads.
    pub(crate) _guest_memory: GuestMemoryMmap,
    pub(crate) _vm: Arc<Vm>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) devices: Devices,
    pub(crate) resources: VmResources,
    pub(crate) paused: bool,
    pub(crate) event_manager: EventManager<Subscriber>,
    pub(crate) exit_handler: Arc<Mutex<ExitHandler>>,
    pub(crate) _terminal: Option<TerminalGuard>,
    /// The device counters' totals at the last metrics flush.
    pub(crate) flushed_totals: Mutex<HashMap<String, u64>>,
    /// The log the backends mark the pages they write in, while the
    /// microVM tracks dirty pages.
    pub(crate) dirty_log: Option<Arc<DirtyLog>>,
    /// Pages written since the last snapshot that a failed one took out
    /// of the logs: the next Diff writes them too.
    pub(crate) unsaved_dirty_pages: Mutex<Option<DirtyPages>>,
    /// Guest memory started as zeros: a page never touched holds zeros
    /// (not so for a loaded snapshot's, mapped from its memory file).
    pub(crate) fresh_memory: bool,
    /// The CPU features the guest was shown, which a migration's
    /// destination must offer too.
    pub(crate) guest_cpu: CpuFeatures,
    /// What fills a loaded snapshot's memory on demand, if anything.
    pub(crate) _on_demand_memory: Option<crate::snapshot::OnDemandMemory>,
    /// The outgoing live migration, running or ended.
    pub(crate) migration: Option<crate::migration::send::Outgoing>,
    /// The guest was paused for a migration's last step (and runs on if
    /// that fails).
    pub(crate) paused_for_migration: bool,
    /// The guest runs on a migration's destination: this process ends.
    pub(crate) migrated_away: bool,
    /// This process received the microVM by a migration.
    pub(crate) received_migration: Option<vmm_config::MigrationStatus>,
}

/// The state of every vhost-user device, their queues stopped.
pub(crate) struct SuspendedDevices {
    drives: Vec<VhostUserDeviceState>,
    interfaces: Vec<VhostUserDeviceState>,
    vsock: Option<VhostUserDeviceState>,
}

/// The vhost-user devices of a microVM.
pub(crate) struct Devices {
    pub(crate) block: Vec<device_manager::BlockTransport>,
    /// Starts the drives' backends (kept for a drive's new file).
    pub(crate) block_spawner: Option<BackendSpawner>,
    pub(crate) net: Vec<device_manager::NetTransport>,
    pub(crate) vsock: Option<device_manager::VsockTransport>,
    /// Served by the VMM itself.
    pub(crate) entropy: Option<device_manager::EntropyTransport>,
    pub(crate) balloon: Option<device_manager::BalloonTransport>,
    /// How the interfaces serve MMDS, if any does.
    pub(crate) mmds: Option<crate::mmds::MmdsService>,
    /// Starts the interfaces' backends (kept for hot-plug).
    pub(crate) net_spawner: Option<BackendSpawner>,
    /// The PCI root bus, with `--enable-pci`.
    pub(crate) pci: Option<device_manager::PciBus>,
    /// The event-loop subscriber that watches each drive's and interface's
    /// backend, to drop when the device is unplugged.
    pub(crate) monitors: HashMap<DeviceName, event_manager::SubscriberId>,
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
            self.serve_migration();
            if self.migrated_away {
                self.stop_vcpus();
                return ExitCode::Ok;
            }
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

    /// `PUT /snapshot/create`: writes the paused microVM's state and its
    /// guest memory. The vCPUs stay paused.
    pub fn create_snapshot(
        &self,
        params: &CreateSnapshotParams,
    ) -> Result<(), CreateSnapshotError> {
        if !self.paused {
            return Err(CreateSnapshotError::NotPaused);
        }
        if self.is_migrating() {
            return Err(CreateSnapshotError::Migrating);
        }
        let started = std::time::Instant::now();
        // The backends first: they stop writing into guest memory, and the
        // interrupts their last completions raise are in the interrupt
        // controllers before those are saved. Whatever happens next, each
        // then takes its queues up again where they are.
        let devices = self.suspend_devices();
        let state = devices.and_then(|devices| self.machine_state(devices));
        let written = state.and_then(|state| {
            self.write_memory(params)?;
            Ok(snapshot::file::write(&params.snapshot_path, &state)?)
        });
        self.resume_devices();
        written?;
        log::info!(
            "{:?} snapshot created in {:?}: {} and {}",
            params.snapshot_type,
            started.elapsed(),
            params.snapshot_path.display(),
            params.mem_file_path.display()
        );
        Ok(())
    }

    /// Pages the next Diff snapshot writes whatever the logs say.
    pub(crate) fn keep_for_next_diff(&self, pages: &DirtyPages) {
        let mut unsaved = lock(&self.unsaved_dirty_pages);
        match unsaved.as_mut() {
            Some(kept) => kept.merge(pages),
            None => *unsaved = Some(pages.clone()),
        }
    }

    /// Writes guest memory for a snapshot: every page for a Full one, the
    /// pages written since the last snapshot for a Diff. Either way the
    /// dirty logs start again from here; if the write fails, what they
    /// held is kept for the next Diff.
    fn write_memory(&self, params: &CreateSnapshotParams) -> Result<(), CreateSnapshotError> {
        let mem = &self._guest_memory;
        let tracked = if self.resources.machine_config.track_dirty_pages {
            let mut pages = dirty::take_tracked(&self._vm, mem, self.dirty_log.as_deref())?;
            if let Some(unsaved) = lock(&self.unsaved_dirty_pages).take() {
                pages.merge(&unsaved);
            }
            Some(pages)
        } else {
            None
        };
        let written = match params.snapshot_type {
            SnapshotType::Full => snapshot::write_memory(mem, &params.mem_file_path),
            SnapshotType::Diff => {
                let pages = match &tracked {
                    Some(pages) if self.devices_log_dirty_pages() => pages.clone(),
                    _ => dirty::resident(mem)?,
                };
                log::info!("Diff snapshot: {} dirty pages", pages.count());
                dirty::write_dirty_memory(mem, &params.mem_file_path, &pages)
            }
        };
        if written.is_err() {
            *lock(&self.unsaved_dirty_pages) = tracked;
        }
        written
    }

    /// Whether every device's backend logs the pages it writes.
    fn devices_log_dirty_pages(&self) -> bool {
        fn logs<D: VhostUserDevice>(transport: &Mutex<VirtioTransport<D>>) -> bool {
            lock(transport).device().queues().logs_dirty_pages()
        }
        self.devices.block.iter().all(|t| logs(t))
            && self.devices.net.iter().all(|t| logs(t))
            && self.devices.vsock.iter().all(|t| logs(t))
    }

    /// Everything but guest memory, the devices' states given.
    pub(crate) fn machine_state(
        &self,
        devices: SuspendedDevices,
    ) -> Result<MicrovmState, CreateSnapshotError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|vcpu| vcpu.save_state(VCPU_ACK_TIMEOUT))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MicrovmState {
            drives: devices.drives,
            interfaces: devices.interfaces,
            vsock: devices.vsock,
            entropy: self.devices.entropy.as_ref().map(|t| lock(t).state()),
            entropy_pci: self
                .devices
                .entropy
                .as_ref()
                .and_then(|t| lock(t).pci_state()),
            balloon: self.devices.balloon.as_ref().map(|t| {
                let t = lock(t);
                snapshot::BalloonSnapshot {
                    transport: t.state(),
                    pci: t.pci_state(),
                    device: t.device().state(),
                }
            }),
            config: self.resources.to_config_json(),
            memory: snapshot::memory_layout(&self._guest_memory),
            vm: self._vm.save_state()?,
            vcpus,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
            i8042: self.i8042.lock().unwrap_or_else(|p| p.into_inner()).state(),
        })
    }

    /// Stops every drive's and interface's queues (each backend completes
    /// what it has in flight first) and returns their states.
    pub(crate) fn suspend_devices(&self) -> Result<SuspendedDevices, CreateSnapshotError> {
        Ok(SuspendedDevices {
            drives: (self.devices.block.iter())
                .map(|t| snapshot::suspend_device(t))
                .collect::<Result<_, _>>()?,
            interfaces: (self.devices.net.iter())
                .map(|t| snapshot::suspend_device(t))
                .collect::<Result<_, _>>()?,
            vsock: (self.devices.vsock.as_ref())
                .map(|t| snapshot::suspend_device(t))
                .transpose()?,
        })
    }

    /// After a snapshot: every device's backend takes its queues up again
    /// on the same connection (a vsock device's guest is told its
    /// connections ended); one that cannot is hung up on, and the backend
    /// monitor brings in a new one.
    pub(crate) fn resume_devices(&self) {
        for transport in &self.devices.block {
            snapshot::resume_device(transport);
        }
        for transport in &self.devices.net {
            snapshot::resume_device(transport);
        }
        if let Some(transport) = &self.devices.vsock {
            snapshot::resume_device(transport);
        }
    }

    /// Calls `f` with the name and the queues of every vhost-user device.
    pub(crate) fn for_each_device_queues(
        &self,
        mut f: impl FnMut(&DeviceName, &mut devices::vhost_user::VhostUserQueues),
    ) {
        fn with<D: VhostUserDevice>(
            transport: &Mutex<VirtioTransport<D>>,
            f: &mut impl FnMut(&DeviceName, &mut devices::vhost_user::VhostUserQueues),
        ) {
            let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
            let queues = transport.device_mut().queues_mut();
            let name = queues.device().clone();
            f(&name, queues);
        }
        for transport in &self.devices.block {
            with(transport, &mut f);
        }
        for transport in &self.devices.net {
            with(transport, &mut f);
        }
        if let Some(transport) = &self.devices.vsock {
            with(transport, &mut f);
        }
    }

    /// Asks the guest to announce itself on every interface whose driver
    /// negotiated GUEST_ANNOUNCE (after it moved here): a configuration
    /// interrupt with `VIRTIO_NET_S_ANNOUNCE` set, to which it answers with
    /// gratuitous ARPs from its new TAP.
    pub(crate) fn announce_guest(&self) {
        for transport in &self.devices.net {
            let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
            if transport.device_mut().announce() {
                transport.notify_config_change();
                log::info!(
                    "{}: asked the guest to announce itself",
                    transport.device().queues().device()
                );
            }
        }
    }

    /// `PATCH /drives/{id}` on the running microVM. A new `path_on_host`
    /// is opened here (inside the VMM's jail, if jailed), becomes the disk
    /// the drive's backends get, and the current backend is hung up on: the
    /// backend monitor brings in a new one on the new file, which takes
    /// over the queues (requests in flight included) and, if the capacity
    /// changed, the guest gets a configuration change interrupt, as with
    /// Firecracker.
    pub fn update_drive(&mut self, update: &BlockDeviceUpdate) -> Result<(), RuntimeError> {
        let path = self.resources.check_running_drive_update(update)?;
        if let Some(limits) = &update.rate_limiter {
            self.update_drive_limits(&update.drive_id, limits)?;
        }
        match path {
            Some(path) => self.replace_drive_file(&update.drive_id, path),
            None => Ok(()),
        }
    }

    /// The drive's limits after `update`, sent to its backend (which takes
    /// them at once: a throttled queue goes on at its next timer) and kept
    /// for its next backends.
    fn update_drive_limits(
        &mut self,
        id: &str,
        update: &RateLimiterConfig,
    ) -> Result<(), RuntimeError> {
        let transport = self
            .devices
            .block
            .iter()
            .find(|t| lock(t).device().id() == id)
            .ok_or_else(|| crate::resources::ResourcesError::UnknownDrive(id.to_string()))?;
        let current = self
            .resources
            .drives
            .iter()
            .find(|d| d.drive_id == id)
            .and_then(|d| d.rate_limiter)
            .unwrap_or_default();
        let limits = current.updated(update);
        lock(transport)
            .device_mut()
            .queues_mut()
            .send_control(&drive_limits_message(limits))
            .map_err(|err| RuntimeError::DriveLimits {
                id: id.to_string(),
                reason: err.to_string(),
            })?;
        self.resources.update_running_drive_limits(id, update)?;
        log::info!("drive {id}: rate limits now {limits:?}");
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` on the running microVM: the
    /// directions it names get their merged limits, sent to the backend
    /// (which takes them at once) and kept for its next backends.
    pub fn update_network_interface(
        &mut self,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(), RuntimeError> {
        let id = &update.iface_id;
        let (rx, tx) = self.resources.interface_limits_after(update)?;
        let transport = self
            .devices
            .net
            .iter()
            .find(|t| lock(t).device().id() == id)
            .ok_or_else(|| crate::resources::ResourcesError::UnknownInterface(id.clone()))?;
        for message in interface_limits_messages(rx, tx, true) {
            lock(transport)
                .device_mut()
                .queues_mut()
                .send_control(&message)
                .map_err(|err| RuntimeError::InterfaceLimits {
                    id: id.clone(),
                    reason: err.to_string(),
                })?;
        }
        self.resources.set_interface_limits(id, rx, tx);
        log::info!("interface {id}: rate limits now rx {rx:?}, tx {tx:?}");
        Ok(())
    }

    /// Starts a new backend for the drive on the file at `path`.
    fn replace_drive_file(&mut self, id: &str, path: &str) -> Result<(), RuntimeError> {
        let id = &id.to_string();
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
            .devices
            .block
            .iter()
            .find(|t| lock(t).device().id() == id)
            .ok_or_else(|| crate::resources::ResourcesError::UnknownDrive(id.clone()))?;
        let transport = lock(transport);
        if transport.device().is_given_up() {
            return Err(RuntimeError::DriveGivenUp(id.clone()));
        }
        if let Some(spawner) = &self.devices.block_spawner {
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

    /// Per-device metrics for a flush: what happened since the previous
    /// one, as with Firecracker (`activate_time_us` is the last value).
    pub fn device_metrics(&self) -> DeviceCounters {
        let c = lock(&self.i8042).counters();
        let mut totals = vec![
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
        let mut increments = Vec::new();
        for transport in &self.devices.block {
            let transport = lock(transport);
            let key = format!("block_{}", transport.device().id());
            totals.push((key.clone(), vhost_user_totals(&transport)));
            increments.push((key, backend_increments(&transport)));
        }
        let mut mmds = serde_json::Map::new();
        for transport in &self.devices.net {
            let transport = lock(transport);
            let key = format!("net_{}", transport.device().id());
            totals.push((key.clone(), vhost_user_totals(&transport)));
            let (net, its_mmds) = split_mmds(backend_increments(&transport));
            increments.push((key, net));
            add_counters(&mut mmds, its_mmds);
        }
        if !self.devices.net.is_empty() {
            totals.push(("mmds".to_string(), serde_json::json!({})));
            increments.push(("mmds".to_string(), mmds));
        }
        if let Some(transport) = &self.devices.vsock {
            let transport = lock(transport);
            totals.push(("vsock".to_string(), vhost_user_totals(&transport)));
            increments.push(("vsock".to_string(), backend_increments(&transport)));
        }
        if let Some(transport) = &self.devices.entropy {
            let c = lock(transport).device().counters();
            totals.push((
                "entropy".to_string(),
                serde_json::json!({
                    "entropy_event_count": c.entropy_event_count,
                    "entropy_bytes": c.entropy_bytes,
                    "entropy_event_fails": c.entropy_event_fails,
                    "entropy_rate_limiter_throttled": c.entropy_rate_limiter_throttled,
                    "host_rng_fails": c.host_rng_fails,
                }),
            ));
        }
        if let Some(transport) = &self.devices.balloon {
            let c = lock(transport).device().counters();
            totals.push((
                "balloon".to_string(),
                serde_json::json!({
                    "inflate_count": c.inflate_count,
                    "deflate_count": c.deflate_count,
                    "stats_updates_count": c.stats_updates_count,
                    "stats_update_fails": c.stats_update_fails,
                    "event_fails": c.event_fails,
                    "free_page_hint_count": c.free_page_hint_count,
                    "free_page_hint_freed": c.free_page_hint_freed,
                    "free_page_hint_fails": c.free_page_hint_fails,
                    "free_page_report_count": c.free_page_report_count,
                    "free_page_report_freed": c.free_page_report_freed,
                    "free_page_report_fails": c.free_page_report_fails,
                    "inflated_bytes": c.inflated_bytes,
                }),
            ));
        }
        let mut flushed = lock(&self.flushed_totals);
        let mut counters: DeviceCounters = totals
            .into_iter()
            .map(|(key, totals)| {
                let since = since_last_flush(&mut flushed, &key, totals);
                (key, since)
            })
            .collect();
        for (key, backend) in increments {
            if let Some((_, serde_json::Value::Object(section))) =
                counters.iter_mut().find(|(k, _)| *k == key)
            {
                section.extend(backend);
            }
        }
        counters
    }
}

/// Counters that report a current value rather than a count.
const GAUGES: &[&str] = &["activate_time_us"];

/// `totals` of `section` turned into increments since the previous call
/// (gauges pass unchanged).
fn since_last_flush(
    flushed: &mut HashMap<String, u64>,
    section: &str,
    totals: serde_json::Value,
) -> serde_json::Value {
    let serde_json::Value::Object(map) = totals else {
        return totals;
    };
    let increments = map
        .into_iter()
        .map(|(name, value)| {
            let total = value.as_u64().unwrap_or(0);
            if GAUGES.contains(&name.as_str()) {
                return (name, value);
            }
            let before = flushed
                .insert(format!("{section}.{name}"), total)
                .unwrap_or(0);
            (name, total.saturating_sub(before).into())
        })
        .collect();
    serde_json::Value::Object(increments)
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}

/// One vhost-user device's own counters, as totals: the transport's and
/// the frontend's.
fn vhost_user_totals<D: VhostUserDevice>(transport: &VirtioTransport<D>) -> serde_json::Value {
    let c = transport.device().queues().counters();
    serde_json::json!({
        "invalid_mmio_accesses": transport.invalid_accesses(),
        "activate_fails": c.activate_fails,
        "cfg_fails": c.cfg_fails,
        "activate_time_us": c.activate_time_us,
        "backend_lost_count": c.backend_lost_count,
        "backend_reconnect_count": c.backend_reconnect_count,
    })
}

/// What the device's backends counted in its stats page since the last
/// flush.
fn backend_increments<D: VhostUserDevice>(
    transport: &VirtioTransport<D>,
) -> serde_json::Map<String, serde_json::Value> {
    let queues = transport.device().queues();
    queues
        .backend_counters()
        .into_iter()
        .map(|(key, delta)| (key.to_string(), delta.into()))
        .collect()
}

/// An interface backend's counters: its own, and its MMDS's (the
/// `mmds_` prefix dropped), which Firecracker reports under `mmds`.
fn split_mmds(
    counters: serde_json::Map<String, serde_json::Value>,
) -> (
    serde_json::Map<String, serde_json::Value>,
    serde_json::Map<String, serde_json::Value>,
) {
    let (mmds, net): (serde_json::Map<_, _>, serde_json::Map<_, _>) = counters
        .into_iter()
        .partition(|(key, _)| key.starts_with("mmds_"));
    let mmds = mmds
        .into_iter()
        .map(|(key, value)| (key["mmds_".len()..].to_string(), value))
        .collect();
    (net, mmds)
}

/// Adds `more` into `sums`, counter by counter.
fn add_counters(
    sums: &mut serde_json::Map<String, serde_json::Value>,
    more: serde_json::Map<String, serde_json::Value>,
) {
    for (key, value) in more {
        let sum = sums.get(&key).and_then(|v| v.as_u64()).unwrap_or(0);
        sums.insert(key, (sum + value.as_u64().unwrap_or(0)).into());
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts the host terminal in raw mode for the guest console and restores
/// canonical mode when the VMM ends.
pub(crate) struct TerminalGuard;

impl TerminalGuard {
    pub(crate) fn raw_stdin() -> Option<Self> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_report_increments_and_gauges_as_they_are() {
        let mut flushed = HashMap::new();
        let totals = |lost: u64, time: u64| serde_json::json!({"backend_lost_count": lost, "activate_time_us": time});
        let first = since_last_flush(&mut flushed, "block_a", totals(2, 900));
        assert_eq!(first["backend_lost_count"], 2);
        let second = since_last_flush(&mut flushed, "block_a", totals(5, 700));
        assert_eq!(second["backend_lost_count"], 3);
        assert_eq!(second["activate_time_us"], 700);
        // Another section counts on its own.
        let other = since_last_flush(&mut flushed, "block_b", totals(1, 0));
        assert_eq!(other["backend_lost_count"], 1);
    }
}
