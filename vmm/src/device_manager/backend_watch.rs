//! Watches a vhost-user device's backend from the main event loop, and
//! brings a new one in when it goes away (it crashed, was killed, or
//! stopped answering), without the guest noticing more than a stall.
//!
//! When the backend's socket hangs up, the device's queues are marked
//! disconnected (the guest's kicks wait in their eventfds) and the device's
//! connector is called: it starts a new backend (a device with
//! `path_on_host` or `host_dev_name`) or connects to the device's socket
//! again. The new backend gets the queues from their used indexes and the
//! inflight region, so a block backend resubmits what the old one left in
//! flight. A failed attempt is retried with a growing delay; after
//! [`RECONNECT_TIMEOUT`], or once a device has needed more than
//! [`MAX_RESTARTS`] new backends in [`RESTART_WINDOW`] (a backend that a
//! guest can crash must not become a fork loop), the device is given up:
//! a disk fails its requests with I/O errors, an interface stops carrying
//! frames.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::vhost_user::{VhostUserDevice, VhostUserFrontend};
use devices::virtio::VirtioTransport;
use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Makes a new backend connection for a device.
pub type Connector = Box<dyn FnMut() -> Result<VhostUserFrontend, String> + Send>;

/// How long a device waits for a new backend before it is given up.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// New backends a device may get within [`RESTART_WINDOW`].
pub const MAX_RESTARTS: usize = 32;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// What an event meant to the watch.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    /// Not one of the watch's events.
    NotOurs,
    /// Handled; the device has a backend or is waiting for one.
    Handled,
    /// The device was given up just now.
    GaveUp,
}

/// The watch over one device's backend.
pub struct BackendWatch<D: VhostUserDevice> {
    transport: Arc<Mutex<VirtioTransport<D>>>,
    /// "drive <id>" or "interface <id>", for log lines.
    label: String,
    connect: Connector,
    /// The socket watched for a hang-up, while a backend is connected.
    socket_fd: Option<RawFd>,
    retry: TimerFd,
    /// Since when the device has been without a backend.
    gone_since: Option<Instant>,
    retry_delay: Duration,
    /// When recent new backends took over.
    restarts: VecDeque<Instant>,
}

impl<D: VhostUserDevice> BackendWatch<D> {
    /// Watches the backend of `transport` (a `kind` device: "drive",
    /// "interface"); `connect` makes a new backend connection for it.
    pub fn new(
        transport: Arc<Mutex<VirtioTransport<D>>>,
        kind: &str,
        connect: Connector,
    ) -> std::io::Result<Self> {
        let guard = transport.lock().unwrap_or_else(|p| p.into_inner());
        let label = format!("{kind} {}", guard.device().id());
        let socket_fd = Some(guard.device().queues().backend_fd());
        drop(guard);
        Ok(Self {
            transport,
            label,
            connect,
            socket_fd,
            retry: TimerFd::new()?,
            gone_since: None,
            retry_delay: FIRST_RETRY_DELAY,
            restarts: VecDeque::new(),
        })
    }

    /// The transport of the watched device.
    pub fn transport(&self) -> &Arc<Mutex<VirtioTransport<D>>> {
        &self.transport
    }

    fn hang_up_events(fd: RawFd) -> Events {
        Events::new_raw(
            fd,
            EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        )
    }

    /// Registers the watch's events.
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.socket_fd {
            if let Err(err) = ops.add(Self::hang_up_events(fd)) {
                log::error!("{}: cannot watch the backend's socket: {err:?}", self.label);
            }
        }
        if let Err(err) = ops.add(Events::new(&self.retry, EventSet::IN)) {
            log::error!("{}: cannot watch the retry timer: {err:?}", self.label);
        }
    }

    /// Handles `events` if they are the watch's.
    pub fn process(&mut self, events: &Events, ops: &mut EventOps) -> Watched {
        if Some(events.fd()) == self.socket_fd {
            self.backend_gone(ops)
        } else if events.fd() == self.retry.as_raw_fd() {
            let _ = self.retry.wait();
            self.try_reconnect(ops)
        } else {
            Watched::NotOurs
        }
    }

    fn backend_gone(&mut self, ops: &mut EventOps) -> Watched {
        if let Some(fd) = self.socket_fd.take() {
            let _ = ops.remove(Self::hang_up_events(fd));
        }
        let mut transport = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        if transport.device().is_given_up() {
            return Watched::Handled;
        }
        transport.device_mut().queues_mut().disconnected();
        drop(transport);
        log::warn!("{}: the backend is gone; bringing in a new one", self.label);
        self.gone_since = Some(Instant::now());
        self.retry_delay = FIRST_RETRY_DELAY;
        self.try_reconnect(ops)
    }

    fn try_reconnect(&mut self, ops: &mut EventOps) -> Watched {
        let Some(gone_since) = self.gone_since else {
            return Watched::Handled;
        };
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|at| now.duration_since(*at) > RESTART_WINDOW)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() >= MAX_RESTARTS {
            return self.give_up(&format!(
                "it needed {MAX_RESTARTS} new backends within {RESTART_WINDOW:?}"
            ));
        }
        match self.take_over() {
            Ok(fd) => {
                if let Err(err) = ops.add(Self::hang_up_events(fd)) {
                    log::error!("{}: cannot watch the backend's socket: {err:?}", self.label);
                }
                self.socket_fd = Some(fd);
                self.gone_since = None;
                self.restarts.push_back(Instant::now());
                log::info!(
                    "{}: a new backend took over after {} ms",
                    self.label,
                    gone_since.elapsed().as_millis()
                );
                return Watched::Handled;
            }
            Err(err) => log::warn!("{}: no new backend yet: {err}", self.label),
        }
        if gone_since.elapsed() >= RECONNECT_TIMEOUT {
            return self.give_up(&format!(
                "no backend came back within {RECONNECT_TIMEOUT:?}"
            ));
        }
        if let Err(err) = self.retry.reset(self.retry_delay, None) {
            return self.give_up(&format!("cannot arm the retry timer: {err}"));
        }
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
        Watched::Handled
    }

    /// Connects a new backend and hands it the queues; returns its socket.
    /// A backend whose configuration differs (a drive on a new file) is
    /// announced to the guest with a configuration change interrupt.
    fn take_over(&mut self) -> Result<RawFd, String> {
        let frontend = (self.connect)()?;
        let mut transport = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        let queues = transport.device_mut().queues_mut();
        let changed = queues.reconnect(frontend).map_err(|err| err.to_string())?;
        let fd = queues.backend_fd();
        if changed {
            log::info!(
                "{}: its configuration changed; telling the guest",
                self.label
            );
            transport.notify_config_change();
        }
        Ok(fd)
    }

    fn give_up(&mut self, why: &str) -> Watched {
        log::error!("{}: giving the device up: {why}", self.label);
        self.gone_since = None;
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device_mut()
            .give_up();
        Watched::GaveUp
    }
}
