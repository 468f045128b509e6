//! The VMM side of the API: the API thread sends typed actions over a
//! channel and wakes this side with an eventfd; the main thread carries them
//! out and sends back the outcome.
//!
//! Before `InstanceStart` the main thread blocks on the channel and edits
//! [`VmResources`]; after it, actions are taken between event-loop rounds,
//! with the running [`Vmm`] at hand. Calls made in the wrong phase get
//! Firecracker's "not supported before/after starting the microVM".

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_server::{ActionError, VmmAction, VmmChannel, VmmData, APP_NAME, VMM_VERSION};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_config::{InstanceInfo, MigrationPhase, MigrationStatus, MmdsError, VmState};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::balloon::BalloonActionError;
use crate::builder::{build_microvm, BootOptions};
use crate::logger;
use crate::metrics::{self, metrics, RequestCounters, FLUSH_INTERVAL_SECS};
use crate::migration::receive::receive_microvm;
use crate::resources::VmResources;
use crate::runtime::Vmm;
use crate::snapshot::load::load_microvm;

/// The answer to a migration received into a process already configured.
const RECEIVE_NOT_ALLOWED: &str = "Receive migration error: a migration is received only by a \
     fresh process, before any boot-specific resource is configured.";

/// Firecracker's answer to a load into a process already configured.
const LOAD_NOT_ALLOWED: &str = "Load snapshot error: Loading a microVM snapshot not allowed after \
     configuring boot-specific resources.";

type Outcome = Result<VmmData, ActionError>;

/// Time for the API thread to write an answer it has taken.
const ANSWER_WRITE_GRACE: Duration = Duration::from_millis(50);

/// The main thread's end of the API channel.
pub struct ApiEndpoint {
    requests: Receiver<VmmAction>,
    responses: Sender<Outcome>,
    wake: EventFd,
    /// Answers sent, and those the API thread has taken.
    sent: Cell<u64>,
    taken: Arc<AtomicU64>,
}

impl ApiEndpoint {
    /// Creates both ends: this one, and the one the API thread takes.
    pub fn new() -> std::io::Result<(Self, VmmChannel)> {
        let (request_sender, requests) = channel();
        let (responses, response_receiver) = channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let taken = Arc::new(AtomicU64::new(0));
        let channel = VmmChannel {
            requests: request_sender,
            wake: wake.try_clone()?,
            responses: response_receiver,
            taken: taken.clone(),
        };
        Ok((
            Self {
                requests,
                responses,
                wake,
                sent: Cell::new(0),
                taken,
            },
            channel,
        ))
    }

    fn respond(&self, outcome: Outcome) {
        // The API thread lives as long as the process; a failed send only
        // happens while the process is exiting.
        if self.responses.send(outcome).is_ok() {
            self.sent.set(self.sent.get() + 1);
        }
    }

    /// Before the process ends: waits (up to `limit`) until the API thread
    /// has taken every answer, then lets it write the last one out. A
    /// migration's source ends moments after it answered the send; a
    /// client must not see the connection close instead.
    pub fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.taken.load(Ordering::Acquire) < self.sent.get() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(ANSWER_WRITE_GRACE);
    }
}

/// Counts a request and, if it failed, a failure.
fn counted(counters: &RequestCounters, outcome: Outcome) -> Outcome {
    counters.count.inc();
    if outcome.is_err() {
        counters.fails.inc();
    }
    outcome
}

fn empty<E: std::fmt::Display>(result: Result<(), E>) -> Outcome {
    result.map(|()| VmmData::Empty).map_err(ActionError::failed)
}

fn instance_info(instance_id: &str, state: VmState) -> VmmData {
    VmmData::InstanceInfo(InstanceInfo {
        id: instance_id.to_string(),
        state,
        vmm_version: VMM_VERSION.to_string(),
        app_name: APP_NAME.to_string(),
    })
}

/// Applies the logger and metrics sections of a configuration.
pub fn apply_observability(resources: &VmResources) -> Result<(), String> {
    if let Some(config) = &resources.logger {
        logger::configure(config).map_err(|e| e.to_string())?;
    }
    if let Some(config) = &resources.metrics {
        metrics::configure(Path::new(&config.metrics_path)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Serves the API until `InstanceStart` succeeds, then returns the VMM.
/// Returns `None` if the API thread went away.
pub fn run_preboot(
    endpoint: &ApiEndpoint,
    resources: &mut VmResources,
    options: &BootOptions,
    instance_id: &str,
) -> Option<Vmm> {
    // Set by any boot-specific configuration (even a refused one), as in
    // Firecracker: a snapshot loads only into a fresh process.
    let mut boot_path = false;
    loop {
        let action = endpoint.requests.recv().ok()?;
        let _ = endpoint.wake.read();
        let m = metrics();
        boot_path |= matches!(
            action,
            VmmAction::PutMachineConfig(_)
                | VmmAction::PatchMachineConfig(_)
                | VmmAction::PutBootSource(_)
                | VmmAction::PutDrive(_)
                | VmmAction::PutNetworkInterface(_)
                | VmmAction::PutVsock(_)
                | VmmAction::PutEntropy(_)
                | VmmAction::PutBalloon(_)
                | VmmAction::PutMmdsConfig(_)
        );
        let outcome = match action {
            VmmAction::LoadSnapshot(params) => {
                if boot_path {
                    counted(&m.snapshot_load, Err(ActionError::failed(LOAD_NOT_ALLOWED)))
                } else {
                    match load_microvm(&params, options, resources) {
                        Ok(vmm) => {
                            endpoint.respond(counted(&m.snapshot_load, Ok(VmmData::Empty)));
                            return Some(vmm);
                        }
                        Err(err) => {
                            log::error!("loading a snapshot failed: {err}");
                            let message = format!(
                                "Load snapshot error: Failed to restore from snapshot: {err}"
                            );
                            counted(&m.snapshot_load, Err(ActionError::Failed(message)))
                        }
                    }
                }
            }
            VmmAction::CreateSnapshot(_) => {
                counted(&m.snapshot_create, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::ReceiveMigration(params) => {
                if boot_path {
                    counted(&m.actions, Err(ActionError::failed(RECEIVE_NOT_ALLOWED)))
                } else {
                    match receive_microvm(&params, options, resources) {
                        Ok(mut vmm) => {
                            vmm.received_migration = Some(MigrationStatus {
                                phase: MigrationPhase::Completed,
                                ..Default::default()
                            });
                            endpoint.respond(counted(&m.actions, Ok(VmmData::Empty)));
                            return Some(vmm);
                        }
                        Err(err) => {
                            log::error!("receiving a migration failed: {err}");
                            let message = format!("Receive migration error: {err}");
                            counted(&m.actions, Err(ActionError::Failed(message)))
                        }
                    }
                }
            }
            VmmAction::SendMigration(_) | VmmAction::CancelMigration => {
                counted(&m.actions, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::GetMigration => Ok(VmmData::MigrationStatus(MigrationStatus::default())),
            VmmAction::InstanceStart => {
                let outcome = build_microvm(resources, options).map_err(ActionError::failed);
                match outcome {
                    Ok(vmm) => {
                        endpoint.respond(counted(&m.actions, Ok(VmmData::Empty)));
                        return Some(vmm);
                    }
                    Err(err) => {
                        log::error!("InstanceStart failed: {err}");
                        counted(&m.actions, Err(err))
                    }
                }
            }
            VmmAction::GetInstanceInfo => counted(
                &m.instance_info,
                Ok(instance_info(instance_id, VmState::NotStarted)),
            ),
            VmmAction::GetVmConfig => counted(
                &m.vm_config,
                Ok(VmmData::VmConfig(resources.to_config_json())),
            ),
            VmmAction::GetMachineConfig => counted(
                &m.machine_config_get,
                Ok(VmmData::MachineConfig(resources.machine_config.clone())),
            ),
            VmmAction::PutMachineConfig(config) => counted(
                &m.machine_config_put,
                empty(resources.set_machine_config(config)),
            ),
            VmmAction::PatchMachineConfig(update) => counted(
                &m.machine_config_patch,
                empty(resources.update_machine_config(&update)),
            ),
            VmmAction::PutBootSource(boot_source) => counted(
                &m.boot_source,
                empty(resources.set_boot_source(boot_source)),
            ),
            VmmAction::PutDrive(drive) => {
                counted(&m.drive_put, empty(resources.insert_drive(drive)))
            }
            VmmAction::PutNetworkInterface(iface) => counted(
                &m.network_put,
                empty(resources.insert_network_interface(iface)),
            ),
            VmmAction::DeleteDrive(_) => {
                counted(&m.drive_put, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::DeleteNetworkInterface(_) => {
                counted(&m.network_put, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::PutLogger(config) => {
                let outcome = empty(logger::configure(&config));
                if outcome.is_ok() {
                    resources.logger = Some(config);
                }
                counted(&m.logger, outcome)
            }
            VmmAction::PutMetrics(config) => {
                let outcome = empty(metrics::configure(Path::new(&config.metrics_path)));
                if outcome.is_ok() {
                    resources.metrics = Some(config);
                }
                counted(&m.metrics, outcome)
            }
            VmmAction::PutSerial(config) => counted(&m.serial, empty(resources.set_serial(config))),
            VmmAction::PutVsock(config) => counted(&m.vsock, empty(resources.set_vsock(config))),
            VmmAction::PutEntropy(config) => {
                resources.entropy = Some(config);
                counted(&m.entropy, Ok(VmmData::Empty))
            }
            VmmAction::PutBalloon(config) => {
                counted(&m.balloon_put, empty(resources.set_balloon(config)))
            }
            VmmAction::GetBalloon => counted(
                &m.balloon_get,
                resources
                    .balloon
                    .clone()
                    .map(VmmData::BalloonConfig)
                    .ok_or_else(|| ActionError::failed(BalloonActionError::NotFound)),
            ),
            VmmAction::PatchBalloon(_)
            | VmmAction::PatchBalloonStatistics(_)
            | VmmAction::StartBalloonHinting(_)
            | VmmAction::StopBalloonHinting => {
                counted(&m.balloon_patch, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::GetBalloonStatistics | VmmAction::GetBalloonHintingStatus => {
                counted(&m.balloon_get, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::PutMmds(value) => counted(&m.mmds_put, mmds(resources.mmds.put(value))),
            VmmAction::PutMmdsConfig(config) => counted(
                &m.mmds_put,
                resources
                    .set_mmds_config(config)
                    .map(|()| VmmData::Empty)
                    .map_err(mmds_config_error),
            ),
            VmmAction::PatchMmds(patch) => {
                counted(&m.mmds_patch, mmds(resources.mmds.patch(&patch)))
            }
            VmmAction::GetMmds => counted(&m.mmds_get, Ok(VmmData::Mmds(resources.mmds.get()))),
            VmmAction::FlushMetrics => counted(&m.actions, empty(metrics::flush(Vec::new()))),
            VmmAction::PatchDrive(_) => {
                counted(&m.drive_patch, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::PatchNetworkInterface(_) => {
                counted(&m.network_patch, Err(ActionError::NotSupportedPreBoot))
            }
            VmmAction::SendCtrlAltDel => counted(&m.actions, Err(ActionError::NotSupportedPreBoot)),
            VmmAction::Pause | VmmAction::Resume => {
                counted(&m.vm_state, Err(ActionError::NotSupportedPreBoot))
            }
        };
        endpoint.respond(outcome);
    }
}

/// A change to the metadata store: a store over its limit is a 413.
fn mmds(outcome: Result<(), MmdsError>) -> Outcome {
    outcome.map(|()| VmmData::Empty).map_err(mmds_error)
}

fn mmds_error(err: MmdsError) -> ActionError {
    match err {
        MmdsError::TooLarge => ActionError::TooLarge(err.to_string()),
        MmdsError::NotInitialized => ActionError::failed(err),
    }
}

/// Firecracker's API answer to a refused MMDS configuration, with its
/// "MMMDS" prefix.
fn mmds_config_error(err: crate::resources::ResourcesError) -> ActionError {
    match err {
        crate::resources::ResourcesError::MmdsConfig(inner) => {
            ActionError::Failed(format!("MMMDS config error: {inner}"))
        }
        other => ActionError::failed(other),
    }
}

/// A balloon operation's outcome, with Firecracker's "Balloon update
/// error" prefix on a refusal.
fn balloon(outcome: Result<VmmData, BalloonActionError>) -> Outcome {
    outcome.map_err(|err| ActionError::Failed(format!("Balloon update error: {err}")))
}

/// Carries out one action on the running microVM.
fn handle_runtime(action: VmmAction, vmm: &mut Vmm, instance_id: &str) -> Outcome {
    let m = metrics();
    match action {
        VmmAction::GetInstanceInfo => {
            let state = if vmm.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            };
            counted(&m.instance_info, Ok(instance_info(instance_id, state)))
        }
        VmmAction::GetVmConfig => counted(
            &m.vm_config,
            Ok(VmmData::VmConfig(vmm.resources().to_config_json())),
        ),
        VmmAction::GetMachineConfig => counted(
            &m.machine_config_get,
            Ok(VmmData::MachineConfig(
                vmm.resources().machine_config.clone(),
            )),
        ),
        VmmAction::Pause => counted(&m.vm_state, empty(vmm.pause())),
        VmmAction::Resume => counted(&m.vm_state, empty(vmm.resume())),
        VmmAction::SendCtrlAltDel => counted(&m.actions, empty(vmm.send_ctrl_alt_del())),
        VmmAction::FlushMetrics => counted(&m.actions, empty(metrics::flush(vmm.device_metrics()))),
        VmmAction::PatchDrive(update) => counted(&m.drive_patch, empty(vmm.update_drive(&update))),
        VmmAction::PatchNetworkInterface(update) => counted(
            &m.network_patch,
            empty(vmm.update_network_interface(&update)),
        ),
        VmmAction::PutMachineConfig(_) => counted(&m.machine_config_put, post_boot()),
        VmmAction::PatchMachineConfig(_) => counted(&m.machine_config_patch, post_boot()),
        VmmAction::PutBootSource(_) => counted(&m.boot_source, post_boot()),
        VmmAction::PutDrive(drive) if vmm.can_hotplug() => {
            counted(&m.drive_put, hotplug(vmm.hotplug_drive(drive)))
        }
        VmmAction::PutDrive(_) => counted(&m.drive_put, post_boot()),
        VmmAction::PutNetworkInterface(iface) if vmm.can_hotplug() => {
            counted(&m.network_put, hotplug(vmm.hotplug_interface(iface)))
        }
        VmmAction::PutNetworkInterface(_) => counted(&m.network_put, post_boot()),
        VmmAction::DeleteDrive(id) => counted(&m.drive_put, hotplug(vmm.unplug_drive(&id))),
        VmmAction::DeleteNetworkInterface(id) => {
            counted(&m.network_put, hotplug(vmm.unplug_interface(&id)))
        }
        VmmAction::PutLogger(_) => counted(&m.logger, post_boot()),
        VmmAction::PutMetrics(_) => counted(&m.metrics, post_boot()),
        VmmAction::PutSerial(_) => counted(&m.serial, post_boot()),
        VmmAction::PutVsock(_) => counted(&m.vsock, post_boot()),
        VmmAction::PutEntropy(_) => counted(&m.entropy, post_boot()),
        VmmAction::PutBalloon(_) => counted(&m.balloon_put, post_boot()),
        VmmAction::GetBalloon => counted(
            &m.balloon_get,
            balloon(vmm.balloon_config().map(VmmData::BalloonConfig)),
        ),
        VmmAction::PatchBalloon(update) => counted(
            &m.balloon_patch,
            balloon(
                vmm.update_balloon(update.amount_mib)
                    .map(|()| VmmData::Empty),
            ),
        ),
        VmmAction::PatchBalloonStatistics(update) => counted(
            &m.balloon_patch,
            balloon(
                vmm.update_balloon_statistics(update.stats_polling_interval_s)
                    .map(|()| VmmData::Empty),
            ),
        ),
        VmmAction::GetBalloonStatistics => counted(
            &m.balloon_get,
            balloon(vmm.balloon_statistics().map(VmmData::BalloonStats)),
        ),
        VmmAction::StartBalloonHinting(cmd) => counted(
            &m.balloon_patch,
            balloon(vmm.start_balloon_hinting(cmd).map(|()| VmmData::Empty)),
        ),
        VmmAction::StopBalloonHinting => counted(
            &m.balloon_patch,
            balloon(vmm.stop_balloon_hinting().map(|()| VmmData::Empty)),
        ),
        VmmAction::GetBalloonHintingStatus => counted(
            &m.balloon_get,
            balloon(vmm.balloon_hinting_status().map(VmmData::HintingStatus)),
        ),
        VmmAction::PutMmds(value) => counted(&m.mmds_put, mmds(vmm.put_mmds(value))),
        VmmAction::PatchMmds(patch) => counted(&m.mmds_patch, mmds(vmm.patch_mmds(&patch))),
        VmmAction::GetMmds => counted(
            &m.mmds_get,
            vmm.get_mmds().map(VmmData::Mmds).map_err(mmds_error),
        ),
        VmmAction::PutMmdsConfig(_) => counted(&m.mmds_put, post_boot()),
        VmmAction::InstanceStart => counted(&m.actions, post_boot()),
        VmmAction::LoadSnapshot(_) => counted(&m.snapshot_load, post_boot()),
        VmmAction::SendMigration(params) => {
            let outcome = vmm.send_migration(params).map(|wake| {
                vmm.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(Wakeup {
                    fd: wake,
                })));
            });
            counted(
                &m.actions,
                outcome
                    .map(|()| VmmData::Empty)
                    .map_err(|err| ActionError::Failed(format!("Send migration error: {err}"))),
            )
        }
        VmmAction::CancelMigration => counted(
            &m.actions,
            vmm.cancel_migration()
                .map(|()| VmmData::Empty)
                .map_err(|err| ActionError::Failed(format!("Cancel migration error: {err}"))),
        ),
        VmmAction::GetMigration => Ok(VmmData::MigrationStatus(vmm.migration_status())),
        VmmAction::ReceiveMigration(_) => counted(&m.actions, post_boot()),
        VmmAction::CreateSnapshot(params) => {
            let outcome = vmm.create_snapshot(&params).map_err(|err| {
                log::error!("creating a snapshot failed: {err}");
                ActionError::Failed(format!("Create snapshot error: {err}"))
            });
            counted(&m.snapshot_create, outcome.map(|()| VmmData::Empty))
        }
    }
}

/// A hot-plug or unplug's outcome.
fn hotplug(outcome: Result<(), crate::hotplug::HotplugError>) -> Outcome {
    outcome.map(|()| VmmData::Empty).map_err(|err| {
        log::error!("{err}");
        ActionError::failed(err)
    })
}

fn post_boot() -> Outcome {
    Err(ActionError::NotSupportedPostBoot)
}

/// Drains an eventfd or timerfd when it fires, so that the event loop
/// returns and the runtime work below gets its turn.
struct Wakeup<F: AsRawFd + Send> {
    fd: F,
}

impl<F: AsRawFd + Send> MutEventSubscriber for Wakeup<F> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch a wakeup fd: {err:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from an
        // fd this subscriber owns; eventfd and timerfd reads are 8 bytes.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
    }
}

/// The work done between event-loop rounds while the VM runs: API actions
/// and the periodic metrics flush.
pub struct RuntimeWork {
    endpoint: Option<ApiEndpoint>,
    instance_id: String,
    last_flush: Instant,
}

impl RuntimeWork {
    /// Hooks the API (if any) and the metrics timer into `vmm`'s event loop.
    pub fn attach(
        vmm: &mut Vmm,
        endpoint: Option<ApiEndpoint>,
        instance_id: &str,
    ) -> std::io::Result<Self> {
        if let Some(endpoint) = &endpoint {
            vmm.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(Wakeup {
                fd: endpoint.wake.try_clone()?,
            })));
        }
        let mut timer = TimerFd::new()?;
        let interval = std::time::Duration::from_secs(FLUSH_INTERVAL_SECS);
        timer.reset(interval, Some(interval))?;
        vmm.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(Wakeup {
            fd: timer,
        })));
        Ok(Self {
            endpoint,
            instance_id: instance_id.to_string(),
            last_flush: Instant::now(),
        })
    }

    /// Before the process ends after a migration: the API's last answer
    /// gets out (see [`ApiEndpoint::drain`]).
    pub fn finish(&self) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.drain(Duration::from_secs(5));
        }
    }

    /// Runs after each event-loop round.
    pub fn run(&mut self, vmm: &mut Vmm) {
        if let Some(endpoint) = &self.endpoint {
            while let Ok(action) = endpoint.requests.try_recv() {
                let outcome = handle_runtime(action, vmm, &self.instance_id);
                endpoint.respond(outcome);
            }
        }
        if self.last_flush.elapsed().as_secs() >= FLUSH_INTERVAL_SECS {
            self.last_flush = Instant::now();
            if let Err(err) = metrics::flush(vmm.device_metrics()) {
                log::warn!("periodic metrics flush failed: {err}");
            }
        }
    }
}
