//! The VMM's half of a vhost-user network device: the feature set and the
//! configuration space the guest's driver sees, turned into backend setup
//! on activation. Frames never pass through the VMM.
//!
//! The guest is offered `CTRL_VQ` (and, with more than one queue pair and
//! a backend that offers `VIRTIO_NET_F_MQ`, `MQ`, with
//! `max_virtqueue_pairs` = the pairs); queue `2 * pairs` is the control
//! queue, which the VMM serves itself ([`CtrlQueue`]) on its own ioeventfd
//! and irqfd. The backend only ever hears of the data queues, and never of
//! `CTRL_VQ`.
//!
//! With the link status in the configuration space the guest is offered
//! `GUEST_ANNOUNCE` too: after a migration (or a snapshot load) the VMM
//! sets `VIRTIO_NET_S_ANNOUNCE` and raises a configuration interrupt; the
//! guest sends gratuitous ARPs (and IPv6 neighbour advertisements) from
//! its new TAP, so that bridges and switches send its traffic there, and
//! acks on the control queue.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::ctrl::{CtrlQueue, CtrlStats};
use crate::vhost_user::{
    features, DeviceKind, DeviceModel, DeviceName, DriverSetup, FrontendError, VhostUser,
    VhostUserDeviceError, VhostUserFrontend, VhostUserQueues, QUEUE_SIZE,
};
use crate::virtio::ActivateError;

/// The virtio device id of network devices.
pub const VIRTIO_ID_NET: u32 = 1;
/// mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
const CONFIG_SPACE_LEN: usize = 12;
/// VIRTIO_NET_F_CTRL_VQ: the VMM serves the control queue, never the
/// backend.
const CTRL_VQ: u64 = 1 << VIRTIO_NET_F_CTRL_VQ;
/// VIRTIO_NET_F_MQ: passed on from the backend only with several pairs.
const MQ: u64 = 1 << VIRTIO_NET_F_MQ;
/// One receive and one transmit queue.
const QUEUES_PER_PAIR: usize = 2;
const MAC: u64 = 1 << VIRTIO_NET_F_MAC;
const MTU: u64 = 1 << VIRTIO_NET_F_MTU;
const STATUS: u64 = 1 << VIRTIO_NET_F_STATUS;
/// VIRTIO_NET_F_GUEST_ANNOUNCE: the VMM's, served on the control queue.
const GUEST_ANNOUNCE: u64 = 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;
/// Where the `status` field sits in the configuration space.
const STATUS_OFFSET: usize = 6;

/// The eventfds of the control queue: its QueueNotify (an ioeventfd the
/// VMM's event loop reads) and its interrupt (an irqfd on the device's IRQ).
struct CtrlEventFds {
    kick: EventFd,
    call: EventFd,
}

/// A virtio-net device whose queues a vhost-user backend serves.
pub type VhostUserNet = VhostUser<Net>;

/// What a network device adds to its queues: the VMM's MAC and features,
/// the queue pairs, and the control queue the VMM serves.
pub struct Net {
    /// `guest_mac`: the VMM's word wins over the backend's, so that an
    /// external backend's guest gets the address it was configured with.
    mac: Option<[u8; 6]>,
    /// Features the VMM offers on its own (MAC for a backend without one,
    /// CTRL_VQ): never passed to the backend, which would refuse them.
    vmm_features: u64,
    /// `max_virtqueue_pairs`: 1, or the pairs asked for that the backend
    /// serves.
    pairs: u16,
    ctrl_fds: CtrlEventFds,
    /// The control queue, from an activation that negotiated CTRL_VQ to
    /// reset.
    ctrl: Option<CtrlQueue>,
    /// The driver acked GUEST_ANNOUNCE.
    guest_announces: bool,
}

impl VhostUserNet {
    /// Wraps a negotiated frontend; creates the kick and call eventfds of
    /// the data queues (and of the control queue), for the caller to
    /// register as ioeventfds and irqfds. With `mac` the guest gets that
    /// address whatever the backend says. The guest gets up to `pairs`
    /// queue pairs: as many as the backend serves, and 1 unless it offers
    /// `VIRTIO_NET_F_MQ`.
    pub fn new(
        id: &str,
        frontend: VhostUserFrontend,
        mem: GuestMemoryMmap,
        mac: Option<[u8; 6]>,
        pairs: u16,
    ) -> Result<Self, VhostUserDeviceError> {
        let backend_features = frontend.backend_features();
        let backend_queues = frontend.queue_num();
        let backend_mq = backend_features & MQ != 0;
        let backend_pairs = u16::try_from(backend_queues / QUEUES_PER_PAIR).unwrap_or(u16::MAX);
        let served = if backend_mq {
            pairs.min(backend_pairs).max(1)
        } else {
            1
        };
        if served < pairs {
            crate::guest_log_here!(
                log::Level::Warn,
                "interface {id}: {pairs} queue pairs asked for, but the backend serves \
                 {backend_queues} queue(s) {} VIRTIO_NET_F_MQ: the guest gets {served}",
                if backend_mq { "with" } else { "without" }
            );
        }
        let pairs = served;
        let mut features = features::offered_to_guest(backend_features) & !CTRL_VQ & !MQ;
        if !frontend.has_config() {
            // Nothing to read them from: the guest assumes the link is up
            // and picks its MTU, and the VMM offers a MAC only if it has
            // one (`guest_mac`).
            features &= !(MAC | MTU | STATUS);
        }
        let mut vmm_features = match mac {
            Some(_) => MAC & !features,
            None => 0,
        };
        // CTRL_VQ is ours; MQ is the backend's (it serves the pairs).
        vmm_features |= CTRL_VQ;
        if features & STATUS != 0 {
            vmm_features |= GUEST_ANNOUNCE;
        }
        if pairs > 1 {
            features |= MQ;
        }
        features |= vmm_features;
        let data_queues = QUEUES_PER_PAIR * usize::from(pairs);
        let device = DeviceName::new(DeviceKind::Interface, id);
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|err| {
                VhostUserDeviceError::Frontend {
                    device: device.clone(),
                    source: FrontendError::EventFd(err),
                }
            })
        };
        let ctrl_fds = CtrlEventFds {
            kick: eventfd()?,
            call: eventfd()?,
        };
        let queues = VhostUserQueues::new(device, frontend, mem, data_queues, CONFIG_SPACE_LEN)?;
        let queue_count = data_queues + 1;
        let model = Net {
            mac,
            vmm_features,
            pairs,
            ctrl_fds,
            ctrl: None,
            guest_announces: false,
        };
        Ok(Self::with_model(queues, features, queue_count, model))
    }

    /// The queue pairs offered to the guest (`max_virtqueue_pairs`).
    pub fn queue_pairs(&self) -> u16 {
        self.model.pairs
    }

    /// The control queue's index, its kick eventfd (to register as an
    /// ioeventfd matching that index) and its call eventfd (an irqfd).
    pub fn ctrl_eventfds(&self) -> (u32, &EventFd, &EventFd) {
        let fds = &self.model.ctrl_fds;
        (2 * u32::from(self.model.pairs), &fds.kick, &fds.call)
    }

    /// Asks the guest to announce itself (after it moved): returns whether
    /// it will, that is whether its driver acked GUEST_ANNOUNCE. The caller
    /// then raises the configuration change interrupt.
    pub fn announce(&mut self) -> bool {
        match self.model.ctrl.as_mut() {
            Some(ctrl) if self.model.guest_announces => {
                ctrl.announce();
                true
            }
            _ => false,
        }
    }

    /// What the control queue has answered since the last activation.
    pub fn ctrl_stats(&self) -> Option<CtrlStats> {
        self.model.ctrl.as_ref().map(CtrlQueue::stats)
    }

    /// The guest notified the control queue: answers its commands and
    /// interrupts it if it wants. Called from the VMM's event loop.
    pub fn process_ctrl_queue(&mut self) {
        let fds = &self.model.ctrl_fds;
        // Non-blocking: a spurious wake-up reads nothing.
        let _ = fds.kick.read();
        let Some(ctrl) = self.model.ctrl.as_mut() else {
            crate::guest_log_here!(
                log::Level::Debug,
                "{}: control queue notified while inactive",
                self.queues.device()
            );
            return;
        };
        if ctrl.process(self.queues.mem(), self.queues.dirty_log()) {
            if let Err(err) = fds.call.write(1) {
                crate::guest_log_here!(
                    log::Level::Error,
                    "{}: cannot interrupt the guest for its control queue: {err}",
                    self.queues.device()
                );
            }
        }
    }
}

impl DeviceModel for Net {
    const DEVICE_TYPE: u32 = VIRTIO_ID_NET;

    fn read_config(&mut self, queues: &mut VhostUserQueues, offset: u64, data: &mut [u8]) {
        let mac = self.mac;
        let pairs = self.pairs;
        let announcing = self.ctrl.as_ref().is_some_and(CtrlQueue::announcing);
        let result = queues.read_config(CONFIG_SPACE_LEN, offset, data, |space| {
            if let Some(mac) = mac {
                space[0..6].copy_from_slice(&mac);
            }
            if announcing {
                space[STATUS_OFFSET] |= VIRTIO_NET_S_ANNOUNCE as u8;
            }
            // The pairs this frontend set up, whatever the backend
            // could serve.
            space[8..10].copy_from_slice(&pairs.to_le_bytes());
        });
        if let Err(err) = result {
            queues.backend_failed("config read", err);
        }
    }

    fn activate(
        &mut self,
        queues: &mut VhostUserQueues,
        driver: DriverSetup<'_>,
    ) -> Result<(), ActivateError> {
        let mq = driver.acked_features & MQ != 0;
        let ctrl_vq = driver.acked_features & CTRL_VQ != 0;
        let data_count = if mq {
            QUEUES_PER_PAIR * usize::from(self.pairs)
        } else {
            QUEUES_PER_PAIR
        };
        if ctrl_vq && !mq && self.pairs > 1 {
            // Its control queue would be queue 2, whose notifications go
            // to the backend's kick eventfd.
            return Err(ActivateError::BadQueue {
                index: QUEUES_PER_PAIR,
                reason: format!(
                    "{}: the driver acked VIRTIO_NET_F_CTRL_VQ without \
                     VIRTIO_NET_F_MQ; the control queue is served only at index {}",
                    queues.device(),
                    2 * self.pairs
                ),
            });
        }
        let data = &driver.layouts[..driver.layouts.len().min(data_count)];
        let max_pairs = if mq { self.pairs } else { 1 };
        let ctrl = match (ctrl_vq, driver.layouts.get(data_count)) {
            (true, Some(layout)) => Some(
                CtrlQueue::new(
                    &queues.device().id,
                    queues.mem(),
                    layout,
                    QUEUE_SIZE,
                    driver.acked_features & features::EVENT_IDX != 0,
                    max_pairs,
                )
                .map_err(|err| ActivateError::BadQueue {
                    index: data_count,
                    reason: format!("{}: {err}", queues.device()),
                })?,
            ),
            (true, None) => {
                crate::guest_log_here!(
                    log::Level::Warn,
                    "{}: the driver negotiated CTRL_VQ but queue {data_count} (control) \
                     is not ready; control commands will not be answered",
                    queues.device()
                );
                None
            }
            (false, _) => None,
        };
        let mut ctrl = ctrl;
        if let Some(ctrl) = ctrl.as_mut().filter(|_| queues.is_restoring()) {
            ctrl.take_over(queues.mem());
        }
        queues.activate_for_guest(driver.acked_features & !self.vmm_features, data, QUEUE_SIZE)?;
        self.ctrl = ctrl;
        self.guest_announces = driver.acked_features & GUEST_ANNOUNCE != 0;
        crate::guest_log_here!(
            log::Level::Info,
            "{}: active with {} data queue(s){}",
            queues.device(),
            data.len(),
            if self.ctrl.is_some() {
                " and the control queue"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn reset(&mut self, queues: &mut VhostUserQueues) {
        self.ctrl = None;
        self.guest_announces = false;
        queues.reset_for_guest();
    }

    /// Unlike a disk, nothing waits on a network queue: the guest's frames
    /// are simply no longer carried.
    fn give_up(&mut self, queues: &mut VhostUserQueues) {
        queues.give_up("the guest's frames are no longer carried");
    }

    fn own_queue_eventfds(&self) -> Vec<(&EventFd, &EventFd)> {
        vec![(&self.ctrl_fds.kick, &self.ctrl_fds.call)]
    }
}
