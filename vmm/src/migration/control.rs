//! What the VMM thread does for an outgoing migration: start its thread,
//! stop the guest for the last step and hand over the state, and then
//! either end this process (the guest runs on the destination) or let the
//! guest run on here.

use std::sync::Arc;

use devices::vhost_user::DirtyLog;
use vmm_config::{MigrationPhase, MigrationSendParams, MigrationStatus};
use vmm_sys_util::eventfd::EventFd;

use super::send::{Outgoing, Source, Stopped, ToVmm};
use super::Hello;
use crate::runtime::Vmm;
use crate::snapshot::{self, dirty};

/// Why a migration cannot start, or be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("a migration is under way")]
    Busy,
    #[error("no migration is under way")]
    NotRunning,
    #[error("the migration is in its last step and cannot be cancelled")]
    TooLate,
    #[error("cannot track dirty pages: {0}")]
    DirtyTracking(String),
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
}

impl Vmm {
    /// Whether the guest runs on a migration's destination now.
    pub fn migrated_away(&self) -> bool {
        self.migrated_away
    }

    /// Whether an outgoing migration runs.
    pub fn is_migrating(&self) -> bool {
        self.migration.as_ref().is_some_and(Outgoing::is_running)
    }

    /// `PUT /migration/send`: starts sending this microVM; returns the
    /// eventfd that wakes the event loop when the migration needs this
    /// thread.
    pub fn send_migration(
        &mut self,
        params: MigrationSendParams,
    ) -> Result<EventFd, MigrationError> {
        if self.is_migrating() {
            return Err(MigrationError::Busy);
        }
        if !self.resources.machine_config.track_dirty_pages {
            self.start_dirty_tracking()?;
        }
        let hello = Hello {
            config: self.resources.to_config_json(),
            memory: snapshot::memory_layout(&self._guest_memory),
            cpu: self.guest_cpu.clone(),
        };
        let source = Source {
            mem: self._guest_memory.clone(),
            vm: self._vm.clone(),
            dirty_log: self.dirty_log.clone(),
            hello: serde_json::to_vec(&hello).expect("JSON values serialize"),
            fresh_memory: self.fresh_memory,
        };
        log::info!("migration: sending the microVM to {}", params.destination);
        let outgoing = Outgoing::start(source, params).map_err(MigrationError::Thread)?;
        let wake = outgoing.wake_fd().map_err(MigrationError::Thread)?;
        self.migration = Some(outgoing);
        Ok(wake)
    }

    /// Switches dirty page tracking on for a microVM booted without it:
    /// every device marks the pages it writes in the log made at boot,
    /// and KVM logs the vCPUs' writes. It stays on after the migration.
    fn start_dirty_tracking(&mut self) -> Result<(), MigrationError> {
        if let Some(log) = self.dirty_log.clone() {
            self.start_device_dirty_logs(&log)?;
        }
        self._vm
            .track_dirty_pages(&self._guest_memory)
            .map_err(|e| MigrationError::DirtyTracking(e.to_string()))?;
        // The logs know nothing of what was written before: the next Diff
        // snapshot writes every page in memory now, as one without
        // tracking does.
        let resident = dirty::resident(&self._guest_memory)
            .map_err(|e| MigrationError::DirtyTracking(e.to_string()))?;
        self.keep_for_next_diff(&resident);
        self.resources.machine_config.track_dirty_pages = true;
        log::info!("migration: dirty page tracking is on");
        Ok(())
    }

    /// Has every running backend, and the VMM's own entropy and balloon devices, mark
    /// the pages it writes in `log` from now on.
    fn start_device_dirty_logs(&self, log: &Arc<DirtyLog>) -> Result<(), MigrationError> {
        let mut failed = None;
        self.for_each_device_queues(|name, queues| {
            if failed.is_none() {
                if let Err(err) = queues.start_dirty_log(log.clone()) {
                    failed = Some(format!("{name}: {err}"));
                }
            }
        });
        if let Some(reason) = failed {
            return Err(MigrationError::DirtyTracking(reason));
        }
        if let Some(entropy) = &self.devices.entropy {
            entropy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_mut()
                .set_dirty_log(log.clone());
        }
        if let Some(balloon) = &self.devices.balloon {
            balloon
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_mut()
                .set_dirty_log(log.clone());
        }
        Ok(())
    }

    /// `PUT /migration/cancel`.
    pub fn cancel_migration(&self) -> Result<(), MigrationError> {
        match &self.migration {
            Some(m) if m.is_running() => m.cancel().then_some(()).ok_or(MigrationError::TooLate),
            _ => Err(MigrationError::NotRunning),
        }
    }

    /// `GET /migration` on the source.
    pub fn migration_status(&self) -> MigrationStatus {
        match (&self.migration, &self.received_migration) {
            (Some(outgoing), _) => outgoing.status(),
            (None, Some(received)) => received.clone(),
            (None, None) => MigrationStatus {
                phase: MigrationPhase::Idle,
                ..Default::default()
            },
        }
    }

    /// Serves what the migration thread asks, if anything.
    pub(crate) fn serve_migration(&mut self) {
        while let Some(request) = self.migration.as_ref().and_then(Outgoing::next_request) {
            match request {
                ToVmm::Stop => {
                    let stopped = self.stop_for_migration();
                    if let Some(m) = &self.migration {
                        m.answer(stopped);
                    }
                }
                ToVmm::Finish {
                    running_there: true,
                } => self.migrated_away = true,
                ToVmm::Finish {
                    running_there: false,
                } => self.run_on_after_migration(),
            }
        }
    }

    /// Pauses the guest (unless it is), stops every backend's queues once
    /// their requests are done, and returns the state and the pages
    /// written since the migration thread last looked.
    fn stop_for_migration(&mut self) -> Stopped {
        if !self.paused {
            if let Err(err) = self.pause() {
                return Stopped::Failed(err.to_string());
            }
            self.paused_for_migration = true;
        }
        let state = self
            .suspend_devices()
            .and_then(|devices| self.machine_state(devices))
            .map_err(|e| e.to_string())
            .and_then(|state| snapshot::file::encode(&state).map_err(|e| e.to_string()));
        let dirty = state.and_then(|state| {
            dirty::take_tracked(&self._vm, &self._guest_memory, self.dirty_log.as_deref())
                .map(|dirty| (state, dirty))
                .map_err(|e| e.to_string())
        });
        match dirty {
            Ok((state, dirty)) => Stopped::State { state, dirty },
            Err(reason) => {
                self.run_on_after_migration();
                Stopped::Failed(reason)
            }
        }
    }

    /// The migration failed after the guest stopped: the devices take
    /// their queues up again and the guest runs on, as it was.
    fn run_on_after_migration(&mut self) {
        self.resume_devices();
        if std::mem::take(&mut self.paused_for_migration) {
            if let Err(err) = self.resume() {
                log::error!("migration: the guest cannot run on: {err}");
            }
        }
    }
}
