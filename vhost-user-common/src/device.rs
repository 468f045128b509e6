//! One `VhostUserBackend` for every Tessera backend: [`Served`] answers
//! what every device answers alike (the virtio and protocol features every
//! backend offers, the queue size, EVENT_IDX, each worker's exit event and
//! seccomp step, config-space slices, memory updates the daemon makes) and
//! hands the rest to the device, a [`Device`].

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tessera_backend_control::{ControlMessage, CONTROL_OFFSET};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::worker::{self, WorkerExits};
use crate::{BackendMemory, BackendVring};

/// The virtio features every backend offers: virtio 1, EVENT_IDX, and
/// vhost-user's own bits for the protocol features and for logging the
/// pages it writes (LOG_ALL; every [`crate::BackendMemory`] write logs
/// once the frontend shared a log).
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | VhostUserVirtioFeatures::LOG_ALL.bits();

/// What every device's workers share: the largest queue a frontend may set
/// up, whether EVENT_IDX was negotiated, the workers' exit events and
/// their seccomp filters.
#[derive(Debug)]
pub struct WorkerCommon {
    queue_size: usize,
    event_idx: AtomicBool,
    exits: WorkerExits,
    seccomp: tessera_seccomp::Filters,
}

impl WorkerCommon {
    pub fn new(
        queue_size: usize,
        threads: usize,
        seccomp: tessera_seccomp::Filters,
    ) -> io::Result<Self> {
        Ok(Self {
            queue_size,
            event_idx: AtomicBool::new(false),
            exits: WorkerExits::new(threads)?,
            seccomp,
        })
    }

    pub fn queue_size(&self) -> usize {
        self.queue_size
    }

    /// Whether the driver negotiated VIRTIO_RING_F_EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Relaxed)
    }

    pub fn threads(&self) -> usize {
        self.exits.threads()
    }

    /// Wakes every worker thread so that it exits.
    pub fn stop_workers(&self) {
        self.exits.stop_all();
    }
}

/// One worker event, as vhost-user-backend delivers it.
pub struct WorkerEvent<'a> {
    /// A queue's index among the worker's vrings, or a device's own
    /// listener's value.
    pub device_event: u16,
    pub evset: EventSet,
    pub vrings: &'a [BackendVring],
    pub thread: usize,
}

/// What one kind of device adds to the backend every device is.
pub trait Device: Send + Sync + 'static {
    fn common(&self) -> &WorkerCommon;
    fn num_queues(&self) -> usize;
    /// The device's own virtio features (beyond [`FEATURES`]).
    fn device_features(&self) -> u64;
    /// The vhost-user protocol features it offers.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        worker::PROTOCOL_FEATURES
    }
    /// The whole config space.
    fn config_space(&self) -> Vec<u8>;
    /// The queues each worker thread serves, as bitmasks.
    fn queues_per_thread(&self) -> Vec<u64>;
    fn acked_features(&self, _features: u64) {}
    /// A config write; ignored unless the device says otherwise.
    fn set_config(&self, _offset: u32, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    /// A control message from the VMM; refused unless the device takes it.
    fn control(&self, message: ControlMessage) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this backend takes no {message:?}"),
        ))
    }
    /// The frontend stopped `queue` (GET_VRING_BASE).
    fn stop_vring(&self, _queue: u32) -> io::Result<()> {
        Ok(())
    }
    fn get_inflight_fd(&self, _asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn set_inflight_fd(&self, _given: &VhostUserInflight, _file: File) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Serves one event, on a worker already confined.
    fn serve(&self, event: WorkerEvent<'_>) -> io::Result<()>;
}

/// A device served over vhost-user.
#[derive(Debug)]
pub struct Served<D>(pub Arc<D>);

impl<D> Clone for Served<D> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<D: Device> VhostUserBackend for Served<D> {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = BackendVring;

    fn num_queues(&self) -> usize {
        self.0.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.0.common().queue_size
    }

    fn features(&self) -> u64 {
        FEATURES | self.0.device_features()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.0.protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.common().event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        worker::config_slice(&self.0.config_space(), offset, size)
    }

    /// The VMM's control messages come at [`CONTROL_OFFSET`], past every
    /// config space; the rest is the guest's config writes.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset == CONTROL_OFFSET {
            let message = ControlMessage::decode(buf)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
            return self.0.control(message);
        }
        self.0.set_config(offset, buf)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<BackendMemory>) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic the device holds.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.queues_per_thread()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.0.common().exits.exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.0.stop_vring(queue_index)
    }

    fn get_inflight_fd(&self, asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        self.0.get_inflight_fd(asked)
    }

    fn set_inflight_fd(&self, given: &VhostUserInflight, file: File) -> io::Result<()> {
        self.0.set_inflight_fd(given, file)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[BackendVring],
        thread: usize,
    ) -> io::Result<()> {
        worker::confine_worker(&self.0.common().seccomp);
        self.0.serve(WorkerEvent {
            device_event,
            evset,
            vrings,
            thread,
        })
    }
}
