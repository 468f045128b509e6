//! The VMM's half of a vhost-user block device: what the guest's driver
//! sees through the MMIO transport (features, config space), turned into
//! backend setup on activation.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::vhost_user::{
    features, DeviceKind, DeviceModel, DeviceName, DriverSetup, FrontendError, VhostUser,
    VhostUserDeviceError, VhostUserFrontend, VhostUserQueues, QUEUE_SIZE,
};
use crate::virtio::{ActivateError, QueueLayout};

/// The virtio device id of block devices.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The virtio-blk configuration space (virtio 1.2, 5.2.4).
const CONFIG_SPACE_LEN: usize = 60;

/// A virtio-blk device whose queues a vhost-user backend serves.
pub type VhostUserBlock = VhostUser<Block>;

/// What a block device adds to its queues: the queue layouts it may
/// have to serve itself, and those queues once its backend is gone.
pub struct Block {
    /// The queues this frontend set up.
    max_queues: u16,
    acked_features: u64,
    layouts: Vec<QueueLayout>,
    /// After the backend is gone: the queues the VMM completes with errors.
    fallback: Vec<Queue>,
}

/// VIRTIO_BLK_S_IOERR.
const STATUS_IOERR: u8 = 1;

impl VhostUserBlock {
    /// Wraps a negotiated frontend; creates one kick and one call eventfd
    /// per queue, for the caller to register as ioeventfds and irqfds.
    pub fn new(
        id: &str,
        frontend: VhostUserFrontend,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VhostUserDeviceError> {
        let count = frontend.queue_num();
        // Block features pass through; transport features only if we
        // support them in this transport.
        let features = features::offered_to_guest(frontend.backend_features());
        let device = DeviceName::new(DeviceKind::Drive, id);
        if !frontend.has_config() {
            // The capacity is the backend's to say.
            return Err(VhostUserDeviceError::Frontend {
                device,
                source: FrontendError::MissingProtocolFeature("CONFIG"),
            });
        }
        let queues = VhostUserQueues::new(device, frontend, mem, count, CONFIG_SPACE_LEN)?;
        let model = Block {
            max_queues: u16::try_from(count).unwrap_or(u16::MAX),
            acked_features: 0,
            layouts: Vec::new(),
            fallback: Vec::new(),
        };
        Ok(Self::with_model(queues, features, count, model))
    }

    /// Completes every posted request with an I/O error and interrupts the
    /// guest; called on each kick once the backend is gone.
    pub fn fail_pending_requests(&mut self) {
        self.model.fail_pending_requests(&self.queues);
    }
}

impl Block {
    /// The backend is gone: from now on the VMM completes every request on
    /// this disk with an I/O error, so that the guest sees failures on this
    /// disk only and never waits forever. Requests the backend took but did
    /// not complete are answered too: the VMM restarts from the used index.
    fn take_over_queues(&mut self, queues: &mut VhostUserQueues) {
        if !queues.give_up("its requests now fail with I/O errors") {
            return;
        }
        let event_idx = self.acked_features & features::EVENT_IDX != 0;
        for layout in &self.layouts {
            let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
                continue;
            };
            queue.set_size(layout.size);
            let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
            let (lo, hi) = split(layout.desc_table.0);
            queue.set_desc_table_address(lo, hi);
            let (lo, hi) = split(layout.avail_ring.0);
            queue.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(layout.used_ring.0);
            queue.set_used_ring_address(lo, hi);
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(queues.mem()) {
                crate::guest_log_here!(
                    log::Level::Warn,
                    "{}: a queue layout is invalid; not taking it over",
                    queues.device()
                );
                continue;
            }
            let used = queue
                .used_idx(queues.mem(), Ordering::Acquire)
                .map(|w| w.0)
                .unwrap_or(0);
            queue.set_next_avail(used);
            queue.set_next_used(used);
            self.fallback.push(queue);
        }
        self.fail_pending_requests(queues);
    }

    fn fail_pending_requests(&mut self, queues: &VhostUserQueues) {
        let mem = queues.mem();
        for (queue, call) in self.fallback.iter_mut().zip(queues.call_fds()) {
            let mut completed = 0;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let status = chain.last().filter(|d| d.is_write_only() && d.len() > 0);
                let len = match status {
                    Some(desc) if mem.write_obj(STATUS_IOERR, desc.addr()).is_ok() => 1,
                    _ => 0,
                };
                if queue.add_used(mem, head, len).is_err() {
                    break;
                }
                completed += 1;
            }
            let _ = queue.enable_notification(mem);
            if completed > 0 {
                let _ = call.write(1);
            }
        }
    }
}

impl DeviceModel for Block {
    const DEVICE_TYPE: u32 = VIRTIO_ID_BLOCK;

    fn read_config(&mut self, queues: &mut VhostUserQueues, offset: u64, data: &mut [u8]) {
        let max_queues = self.max_queues;
        let result = queues.read_config(CONFIG_SPACE_LEN, offset, data, |space| {
            // The guest may use only the queues this frontend set up,
            // whatever the backend could serve.
            let backend_queues = u16::from_le_bytes([space[34], space[35]]);
            let queues = backend_queues.min(max_queues).max(1);
            space[34..36].copy_from_slice(&queues.to_le_bytes());
        });
        if let Err(err) = result {
            queues.backend_failed("config read", err);
        }
    }

    fn write_config(&mut self, queues: &mut VhostUserQueues, offset: u64, data: &[u8]) {
        if offset > 255 {
            return;
        }
        if let Err(err) = queues.write_config(offset as u32, data) {
            queues.backend_failed("config write", err);
        }
    }

    fn activate(
        &mut self,
        queues: &mut VhostUserQueues,
        driver: DriverSetup<'_>,
    ) -> Result<(), ActivateError> {
        self.acked_features = driver.acked_features;
        self.layouts = driver.layouts.to_vec();
        if let Err(err) =
            queues.activate_for_guest(driver.acked_features, driver.layouts, QUEUE_SIZE)
        {
            self.layouts.clear();
            return Err(err);
        }
        crate::guest_log_here!(
            log::Level::Info,
            "{}: active with {} queue(s)",
            queues.device(),
            driver.layouts.len()
        );
        Ok(())
    }

    fn reset(&mut self, queues: &mut VhostUserQueues) {
        self.layouts.clear();
        self.fallback.clear();
        queues.reset_for_guest();
    }

    fn give_up(&mut self, queues: &mut VhostUserQueues) {
        self.take_over_queues(queues);
    }
}
