//! What every vhost-user device shares: one kick and one call eventfd per
//! queue (for the VMM to register as ioeventfds and irqfds), the frontend
//! calls that start the queues on activation and stop them on a driver
//! reset, and the hand-over to a new backend when the old one is gone.
//!
//! The eventfds, the guest's queue layouts and the inflight region belong
//! to this side, not to a backend, so a new backend takes over exactly
//! where the old one stopped: while none is connected, the guest's kicks
//! wait in the kick eventfds, its config reads are answered from the last
//! config space a backend gave, and its activation and config writes are
//! kept and replayed.

use std::sync::Arc;

use backend_stats::{BlockCounter, NetCounter, StatsPage, StatsReader, VsockCounter};
use tessera_backend_control::ControlMessage;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    features, DeviceKind, DeviceName, DirtyLog, FrontendError, PageFaultServer, QueueSetup,
    VhostUserDeviceError, VhostUserFrontend,
};
use crate::virtio::{ActivateError, QueueLayout};

/// Config writes kept while no backend is connected (each offset once).
const MAX_KEPT_CONFIG_WRITES: usize = 16;

/// What the VMM's side of one device counted, for the metrics (the
/// backend's own figures stay in the backend). Firecracker's vhost-user
/// block metrics are `activate_fails`, `cfg_fails` and `activate_time_us`;
/// the backend counters are Tessera's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrontendCounters {
    /// Activations that failed (the backend refused them, or the device
    /// was given up).
    pub activate_fails: u64,
    /// Config reads and writes the backend refused.
    pub cfg_fails: u64,
    /// How long the last activation took with the backend.
    pub activate_time_us: u64,
    /// Times the backend was found gone.
    pub backend_lost_count: u64,
    /// Backends that took over from a lost one.
    pub backend_reconnect_count: u64,
}

/// The guest's last activation: what a new backend is started with.
#[derive(Debug, Clone)]
struct Activation {
    acked_features: u64,
    layouts: Vec<QueueLayout>,
    queue_max_size: u16,
}

/// A backend connection with the eventfds of `count` queues.
pub struct VhostUserQueues {
    device: DeviceName,
    frontend: VhostUserFrontend,
    /// False from the moment the backend is known gone until a new one
    /// took over.
    connected: bool,
    mem: GuestMemoryMmap,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Set from activation to the next driver reset.
    activation: Option<Activation>,
    /// The config space the backend last gave.
    config_cache: Vec<u8>,
    /// The guest's config writes, replayed to a new backend.
    config_writes: Vec<(u32, Vec<u8>)>,
    /// The VMM's control messages, each with what it sets (a later one
    /// for the same replaces it), replayed to a new backend first.
    controls: Vec<(&'static str, Vec<Vec<u8>>)>,
    /// No backend will come back (see [`Self::give_up`]).
    given_up: bool,
    counters: FrontendCounters,
    /// The counters the device's backends keep (none for an external
    /// backend).
    backend_stats: Option<StatsReader>,
    /// The next activation takes over queues a snapshot saved (from their
    /// used indexes), rather than starting new ones.
    restoring: bool,
    /// The log the backend marks the pages it writes in, while the VMM
    /// tracks dirty pages.
    dirty_log: Option<Arc<DirtyLog>>,
    /// What fills guest memory on demand, while a loaded snapshot does.
    page_faults: Option<Arc<dyn PageFaultServer>>,
}

/// What the VMM's side of a device keeps beyond the transport, for a
/// snapshot: the guest's config writes, which a new backend gets again.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserQueuesState {
    pub config_writes: Vec<(u32, Vec<u8>)>,
}

impl VhostUserQueues {
    /// Wraps `frontend` for `device` and creates the eventfds of `count`
    /// queues; reads the backend's configuration space of `config_len`
    /// bytes, so that the guest can read it even while no backend is
    /// connected. The backend must speak virtio 1 and serve `count` queues.
    pub fn new(
        device: DeviceName,
        frontend: VhostUserFrontend,
        mem: GuestMemoryMmap,
        count: usize,
        config_len: usize,
    ) -> Result<Self, VhostUserDeviceError> {
        if frontend.backend_features() & features::VERSION_1 == 0 {
            return Err(VhostUserDeviceError::NotVirtio1 { device });
        }
        if frontend.queue_num() < count {
            return Err(VhostUserDeviceError::TooFewQueues {
                served: frontend.queue_num(),
                needed: count,
                device,
            });
        }
        let eventfds = || {
            (0..count)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(FrontendError::EventFd)
        };
        let built = (|| {
            let mut queues = Self {
                device: device.clone(),
                frontend,
                connected: true,
                mem,
                kicks: eventfds()?,
                calls: eventfds()?,
                activation: None,
                config_cache: Vec::new(),
                config_writes: Vec::new(),
                controls: Vec::new(),
                given_up: false,
                counters: FrontendCounters::default(),
                backend_stats: None,
                restoring: false,
                dirty_log: None,
                page_faults: None,
            };
            if queues.frontend.has_config() {
                queues.read_config(config_len, 0, &mut vec![0; config_len], |_| {})?;
            } else {
                // The device's own fix-ups fill in what the guest needs.
                queues.config_cache = vec![0; config_len];
            }
            Ok(queues)
        })();
        built.map_err(|source| VhostUserDeviceError::Frontend { device, source })
    }

    /// The device these queues belong to.
    pub fn device(&self) -> &DeviceName {
        &self.device
    }

    /// What this side counted so far.
    pub fn counters(&self) -> FrontendCounters {
        self.counters
    }

    /// Reads the device's counters from `page`, which its backends share
    /// (the VMM started them).
    pub fn read_backend_stats(&mut self, page: Arc<StatsPage>) {
        self.backend_stats = Some(match self.device.kind {
            DeviceKind::Drive => StatsReader::new::<BlockCounter>(page),
            DeviceKind::Interface => StatsReader::new::<NetCounter>(page),
            DeviceKind::Vsock => StatsReader::new::<VsockCounter>(page),
        });
    }

    /// What the backends counted since the previous call, by metrics key
    /// (nothing for an external backend).
    pub fn backend_counters(&self) -> Vec<(&'static str, u64)> {
        self.backend_stats
            .as_ref()
            .map(StatsReader::deltas)
            .unwrap_or_default()
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Each queue's kick eventfd, for ioeventfd registration.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Each queue's call eventfd, for irqfd registration.
    pub fn call_fds(&self) -> &[EventFd] {
        &self.calls
    }

    /// The backend socket, to watch for hang-ups.
    pub fn backend_fd(&self) -> std::os::fd::RawFd {
        self.frontend.socket_fd()
    }

    /// Whether a backend is connected.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Hangs up on the backend, so that the backend monitor brings in a new
    /// one (on a drive's new file, say).
    pub fn hang_up(&self) {
        self.frontend.hang_up();
    }

    /// A call to the backend failed: a lost connection waits for the
    /// backend monitor (a new backend, or the device given up); a refusal
    /// is logged (rate-limited).
    pub fn backend_failed(&mut self, what: &str, err: FrontendError) {
        if err.is_disconnect() {
            if self.connected {
                log::warn!(
                    "{}: the backend is gone ({what}): {err}; waiting for a new one",
                    self.device
                );
            }
            self.lost();
        } else {
            if what.starts_with("config") {
                self.counters.cfg_fails += 1;
            }
            crate::guest_log_here!(
                log::Level::Warn,
                "{}: the backend refused the {what}: {err}",
                self.device
            );
        }
    }

    /// No backend will come back; `consequence` says what that means for
    /// the guest, logged once. Returns whether the device was in use
    /// until now.
    pub fn give_up(&mut self, consequence: &str) -> bool {
        if self.given_up {
            return false;
        }
        log::error!("{}: no backend; {consequence}", self.device);
        self.given_up = true;
        true
    }

    /// Whether the device was given up.
    pub fn is_given_up(&self) -> bool {
        self.given_up
    }

    /// The backend is gone: until [`Self::reconnect`], nothing is sent to
    /// it, and what the guest does is kept for the next one.
    pub fn disconnected(&mut self) {
        self.lost();
    }

    fn lost(&mut self) {
        if self.connected {
            self.counters.backend_lost_count += 1;
        }
        self.connected = false;
    }

    /// Answers a guest read of `data` at `offset` from the backend's
    /// configuration space of `len` bytes. The whole space is fetched so
    /// that `fix_up` can overwrite the fields the VMM owns whatever the
    /// width and offset of the guest's access; reads outside the space, or
    /// a space of the wrong size, give zeros. Without a backend (or when
    /// it turns out gone now) the last space one gave answers.
    pub fn read_config(
        &mut self,
        len: usize,
        offset: u64,
        data: &mut [u8],
        fix_up: impl FnOnce(&mut [u8]),
    ) -> Result<(), FrontendError> {
        data.fill(0);
        let Some(start) = usize::try_from(offset).ok().filter(|o| *o <= len) else {
            return Ok(());
        };
        let Some(window) = start.checked_add(data.len()).map(|end| start..end) else {
            return Ok(());
        };
        if window.end > len {
            return Ok(());
        }
        let fetched = match self.connected && self.frontend.has_config() {
            true => match self.frontend.get_config(0, len as u32) {
                Ok(space) => Some(space),
                Err(err) if err.is_disconnect() => {
                    log::warn!(
                        "{}: the backend is gone (config read): {err}; waiting for a new one",
                        self.device
                    );
                    self.lost();
                    None
                }
                Err(err) => return Err(err),
            },
            false => None,
        };
        let mut space = if let Some(space) = fetched {
            if space.len() != len {
                log::warn!(
                    "{}: the backend's config space is {} bytes, not {len}",
                    self.device,
                    space.len()
                );
                return Ok(());
            }
            self.config_cache.clone_from(&space);
            space
        } else if self.config_cache.len() == len {
            self.config_cache.clone()
        } else {
            return Ok(());
        };
        fix_up(&mut space);
        data.copy_from_slice(&space[window]);
        Ok(())
    }

    /// Sends the VMM's control message `message` to the backend, and keeps
    /// it (in place of the last with its key) for the next backends.
    pub fn send_control(&mut self, message: &ControlMessage) -> Result<(), FrontendError> {
        self.send_controls(std::slice::from_ref(message))
    }

    /// Sends `messages`, which share a key (the pieces of one MMDS store),
    /// in order, and keeps them in place of the last messages with that key.
    pub fn send_controls(&mut self, messages: &[ControlMessage]) -> Result<(), FrontendError> {
        let Some(key) = messages.first().map(ControlMessage::key) else {
            return Ok(());
        };
        debug_assert!(messages.iter().all(|m| m.key() == key));
        self.controls.retain(|(k, _)| *k != key);
        self.controls
            .push((key, messages.iter().map(ControlMessage::encode).collect()));
        if !self.connected {
            return Ok(());
        }
        for message in messages {
            self.frontend.control(&message.encode())?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the backend's configuration space; kept
    /// for the next backend too. The guest's writes never reach the control
    /// offset (the MMIO window ends before it); checked all the same.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        if offset.saturating_add(data.len() as u32) > tessera_backend_control::CONTROL_OFFSET {
            return Ok(());
        }
        self.config_writes.retain(|(at, _)| *at != offset);
        if self.config_writes.len() < MAX_KEPT_CONFIG_WRITES {
            self.config_writes.push((offset, data.to_vec()));
        }
        if !self.connected {
            return Ok(());
        }
        self.frontend.set_config(offset, data)
    }

    /// The guest's driver activated the device: starts `layouts` on the
    /// backend. A backend found gone is left to the monitor (the
    /// activation waits for the next one); a refusal fails the activation.
    pub fn activate_for_guest(
        &mut self,
        acked_features: u64,
        layouts: &[QueueLayout],
        queue_max_size: u16,
    ) -> Result<(), ActivateError> {
        if self.given_up {
            self.counters.activate_fails += 1;
            return Err(ActivateError::Backend(format!(
                "{}: the backend is gone",
                self.device
            )));
        }
        let started = std::time::Instant::now();
        let result = self.start(acked_features, layouts, queue_max_size);
        self.counters.activate_time_us = started.elapsed().as_micros() as u64;
        match result {
            Err(err) if err.is_disconnect() => self.backend_failed("activation", err),
            Err(err) => {
                self.counters.activate_fails += 1;
                return Err(ActivateError::Backend(format!("{}: {err}", self.device)));
            }
            Ok(()) => {}
        }
        Ok(())
    }

    /// The guest's driver reset the device: stops the backend's queues.
    pub fn reset_for_guest(&mut self) {
        if self.given_up {
            return;
        }
        if let Err(err) = self.stop() {
            self.backend_failed("reset", err);
        }
    }

    /// Shares guest memory with the backend and starts `layouts`. Without
    /// a backend the activation is kept, for the next one.
    fn start(
        &mut self,
        acked_features: u64,
        layouts: &[QueueLayout],
        queue_max_size: u16,
    ) -> Result<(), FrontendError> {
        let activation = Activation {
            acked_features,
            layouts: layouts.to_vec(),
            queue_max_size,
        };
        self.activation = Some(activation.clone());
        if !self.connected {
            return Ok(());
        }
        let restoring = std::mem::take(&mut self.restoring);
        self.activate(&activation, restoring)?;
        if restoring {
            self.kick_all(layouts.len());
        }
        Ok(())
    }

    /// Wakes the backend on the first `queues` queues, for what the guest
    /// posted while it was not looking, and interrupts the guest on each:
    /// a completion signalled while no backend or no interrupt controller
    /// state was in place must not be lost (with EVENT_IDX the driver
    /// would never be told again). A spurious interrupt is harmless.
    fn kick_all(&self, queues: usize) {
        for kick in &self.kicks[..queues.min(self.kicks.len())] {
            let _ = kick.write(1);
        }
        for call in &self.calls[..queues.min(self.calls.len())] {
            let _ = call.write(1);
        }
    }

    /// For a snapshot of the paused guest: stops every queue of the
    /// backend (GET_VRING_BASE), which returns once it has completed what
    /// it had in flight, so that it writes no more into guest memory. The
    /// backend is hung up on afterwards (see [`Self::hang_up`]), and the
    /// next one takes the queues over from their used indexes.
    pub fn suspend(&mut self) -> Result<(), FrontendError> {
        let Some(activation) = &self.activation else {
            return Ok(());
        };
        if !self.connected {
            return Ok(());
        }
        self.frontend.suspend(activation.layouts.len())
    }

    /// Has every backend from the next activation on mark the pages it
    /// writes in `log`.
    pub fn set_dirty_log(&mut self, log: Arc<DirtyLog>) {
        self.dirty_log = Some(log);
    }

    /// Has the backend mark the pages it writes in `log` from now on (the
    /// one serving the guest's queues at once, and every later one).
    pub fn start_dirty_log(&mut self, log: Arc<DirtyLog>) -> Result<(), FrontendError> {
        if let Some(activation) = self.activation.as_ref().filter(|_| self.connected) {
            self.frontend
                .start_logging(&log, activation.acked_features)?;
        } else if !self.frontend.can_log() {
            return Err(FrontendError::CannotLog);
        }
        self.dirty_log = Some(log);
        Ok(())
    }

    /// Guest memory is filled on demand by `server` (a loaded snapshot):
    /// every backend from the next activation on has it serve the faults
    /// of its mappings.
    pub fn set_page_fault_server(&mut self, server: Arc<dyn PageFaultServer>) {
        self.page_faults = Some(server);
    }

    /// The dirty log, for the writes the VMM makes into this device's
    /// queues itself.
    pub fn dirty_log(&self) -> Option<&DirtyLog> {
        self.dirty_log.as_deref()
    }

    /// Whether every page this device's backend writes is in the dirty
    /// log: a log was set and the backend logs (or none is serving the
    /// guest's queues).
    pub fn logs_dirty_pages(&self) -> bool {
        self.dirty_log.is_some()
            && (self.activation.is_none() || !self.connected || self.frontend.can_log())
    }

    /// Whether the next activation takes over a loaded snapshot's queues.
    pub fn is_restoring(&self) -> bool {
        self.restoring
    }

    /// What a snapshot keeps of this side.
    pub fn state(&self) -> VhostUserQueuesState {
        VhostUserQueuesState {
            config_writes: self.config_writes.clone(),
        }
    }

    /// Before the transport of a loaded snapshot activates the device
    /// again: replays the guest's config writes to the backend, and, if
    /// the driver had started the device (`active`), makes that activation
    /// take over the saved queues from their used indexes.
    pub fn prepare_restore(
        &mut self,
        state: &VhostUserQueuesState,
        active: bool,
    ) -> Result<(), FrontendError> {
        for (offset, data) in &state.config_writes {
            self.write_config(*offset, data)?;
        }
        self.restoring = active;
        Ok(())
    }

    fn activate(&mut self, activation: &Activation, resume: bool) -> Result<(), FrontendError> {
        let setup = QueueSetup {
            mem: &self.mem,
            acked_features: activation.acked_features,
            queues: &activation.layouts,
            queue_max_size: activation.queue_max_size,
            kicks: &self.kicks,
            calls: &self.calls,
            resume,
            log: self.dirty_log.as_deref(),
            page_faults: self.page_faults.as_deref(),
        };
        self.frontend.activate(&self.device, &setup)
    }

    /// Stops the queues the last activation started (a driver reset).
    fn stop(&mut self) -> Result<(), FrontendError> {
        self.restoring = false;
        let Some(activation) = self.activation.take() else {
            return Ok(());
        };
        self.config_writes.clear();
        if !self.connected {
            // The next activation starts with a fresh inflight region.
            self.frontend.take_inflight();
            return Ok(());
        }
        self.frontend.deactivate(activation.layouts.len())
    }

    /// A new backend takes over from the one that is gone: it gets the
    /// guest's config writes, and, if the guest's driver is active, the
    /// queues from their used indexes with the inflight region (so it
    /// resubmits what the old one left in flight), and a kick on every
    /// queue for what the guest posted meanwhile. Returns whether its
    /// configuration space differs from the old backend's (a drive on a
    /// new file of another size): the guest must then be told.
    pub fn reconnect(&mut self, mut frontend: VhostUserFrontend) -> Result<bool, FrontendError> {
        if self.frontend.has_config() && !frontend.has_config() {
            // The guest reads this device's config space from its backend
            // (a drive's capacity): one without it cannot take over.
            return Err(FrontendError::MissingProtocolFeature("CONFIG"));
        }
        frontend.keep_inflight(self.frontend.take_inflight());
        self.frontend = frontend;
        self.connected = true;
        let resumed = self.resume();
        if let Err(err) = resumed {
            self.connected = false;
            return Err(err);
        }
        self.counters.backend_reconnect_count += 1;
        let before = self.config_cache.clone();
        let len = before.len();
        if len == 0 {
            return Ok(false);
        }
        self.read_config(len, 0, &mut vec![0; len], |_| {})?;
        Ok(self.config_cache != before)
    }

    fn resume(&mut self) -> Result<(), FrontendError> {
        for message in self.controls.clone().iter().flat_map(|(_, group)| group) {
            self.frontend.control(message)?;
        }
        for (offset, data) in self.config_writes.clone() {
            self.frontend.set_config(offset, &data)?;
        }
        if let Some(activation) = self.activation.clone() {
            self.activate(&activation, true)?;
            self.kick_all(activation.layouts.len());
        }
        Ok(())
    }
}
