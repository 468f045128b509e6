//! The entropy device as the virtio-mmio transport sees it: one queue, no
//! configuration space, `VIRTIO_F_VERSION_1` only. Activation builds the
//! queue from the driver's layout; a loaded snapshot's queue goes on from
//! its used index (every request before the snapshot was answered).

use std::sync::Arc;

use tessera_rate_limiter::{RateLimiter, RateLimiterConfig};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::vhost_user::DirtyLog;
use crate::virtio::{
    queue_from_layout, take_over_at_used_index, ActivateError, QueueEventfds, QueueLayout,
    VirtioDevice,
};

/// The virtio device id of entropy devices.
pub const VIRTIO_ID_RNG: u32 = 4;
/// The request queue's largest size (Firecracker's).
pub const ENTROPY_QUEUE_SIZE: u16 = 256;

/// What the device has done, for the metrics (Firecracker's names).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EntropyCounters {
    /// Requests answered with random bytes.
    pub entropy_event_count: u64,
    /// Random bytes written into guest memory.
    pub entropy_bytes: u64,
    /// Requests that waited for the rate limiter.
    pub entropy_rate_limiter_throttled: u64,
    /// Malformed requests (answered with no bytes).
    pub entropy_event_fails: u64,
    /// Host randomness that could not be had (the request is answered
    /// with no bytes).
    pub host_rng_fails: u64,
}

/// What a snapshot keeps of the device besides the transport's registers:
/// nothing but its configuration, which the load brings. Kept as a type so
/// that the state file says an entropy device was there.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntropyState {}

/// A virtio-rng device whose queue the VMM serves.
pub struct Entropy {
    pub(super) mem: GuestMemoryMmap,
    pub(super) kick: EventFd,
    pub(super) call: EventFd,
    pub(super) limiter: RateLimiter,
    /// The queue, from activation to reset.
    pub(super) queue: Option<Queue>,
    pub(super) dirty_log: Option<Arc<DirtyLog>>,
    /// The next activation takes over a loaded snapshot's queue.
    restoring: bool,
    pub(super) counters: EntropyCounters,
}

impl Entropy {
    /// A device limited by `limits`, with its kick and call eventfds (for
    /// the caller to register as an ioeventfd and an irqfd).
    pub fn new(mem: GuestMemoryMmap, limits: &RateLimiterConfig) -> std::io::Result<Self> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        Ok(Entropy {
            mem,
            kick: eventfd()?,
            call: eventfd()?,
            limiter: RateLimiter::new(limits)?,
            queue: None,
            dirty_log: None,
            restoring: false,
            counters: EntropyCounters::default(),
        })
    }

    /// The queue's notification: an ioeventfd on QueueNotify.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The device's interrupt: an irqfd on its IRQ.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The rate limiter's timerfd: readable when a throttled queue may go
    /// on.
    pub fn limiter_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.limiter)
    }

    /// Marks what the device writes into guest memory in `log` (KVM's log
    /// does not see the VMM's own writes).
    pub fn set_dirty_log(&mut self, log: Arc<DirtyLog>) {
        self.dirty_log = Some(log);
    }

    /// The next activation takes over a loaded snapshot's queue.
    pub fn prepare_restore(&mut self) {
        self.restoring = true;
    }

    /// What the device has done so far.
    pub fn counters(&self) -> EntropyCounters {
        EntropyCounters {
            entropy_rate_limiter_throttled: self.limiter.throttled(),
            ..self.counters
        }
    }
}

impl QueueEventfds for Entropy {
    fn queue_eventfds(&self) -> Vec<(&EventFd, &EventFd)> {
        vec![(&self.kick, &self.call)]
    }
}

impl VirtioDevice for Entropy {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[ENTROPY_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        _acked_features: u64,
        queues: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        let layout = queues.first().ok_or_else(|| ActivateError::BadQueue {
            index: 0,
            reason: "entropy: the request queue is not ready".into(),
        })?;
        let mut queue =
            queue_from_layout(&self.mem, layout, ENTROPY_QUEUE_SIZE, false).map_err(|err| {
                ActivateError::BadQueue {
                    index: 0,
                    reason: format!("entropy: {err}"),
                }
            })?;
        if std::mem::take(&mut self.restoring) {
            take_over_at_used_index(&mut queue, &self.mem);
        }
        self.queue = Some(queue);
        crate::guest_log_here!(log::Level::Info, "entropy: active");
        // Requests the driver posted before it said DRIVER_OK.
        self.process_queue_and_notify();
        Ok(())
    }

    fn reset(&mut self) {
        self.queue = None;
    }
}
