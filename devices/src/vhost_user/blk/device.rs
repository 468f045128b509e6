//! The VMM's half of a vhost-user block device: what the guest's driver
//! sees through the MMIO transport (features, config space), turned into
//! backend setup on activation.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::vhost_user::{
    features, DeviceKind, DeviceName, VhostUserDevice, VhostUserDeviceError, VhostUserFrontend,
    VhostUserQueues,
};
use crate::virtio::{ActivateError, QueueLayout, VirtioDevice};

/// The virtio device id of block devices.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The virtio-blk configuration space (virtio 1.2, 5.2.4).
const CONFIG_SPACE_LEN: usize = 60;
/// Entries per queue the guest may use.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio-blk device whose queues a vhost-user backend serves.
pub struct VhostUserBlock {
    queues: VhostUserQueues,
    features: u64,
    queue_sizes: Vec<u16>,
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
        let queues = VhostUserQueues::new(device, frontend, mem, count, CONFIG_SPACE_LEN)?;
        Ok(Self {
            queues,
            features,
            queue_sizes: vec![QUEUE_SIZE; count],
            acked_features: 0,
            layouts: Vec::new(),
            fallback: Vec::new(),
        })
    }

    /// The backend is gone: from now on the VMM completes every request on
    /// this disk with an I/O error, so that the guest sees failures on this
    /// disk only and never waits forever. Requests the backend took but did
    /// not complete are answered too: the VMM restarts from the used index.
    pub fn take_over_queues(&mut self) {
        if !self.queues.give_up("its requests now fail with I/O errors") {
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
            if !queue.is_valid(self.queues.mem()) {
                crate::guest_log_here!(
                    log::Level::Warn,
                    "{}: a queue layout is invalid; not taking it over",
                    self.queues.device()
                );
                continue;
            }
            let used = queue
                .used_idx(self.queues.mem(), Ordering::Acquire)
                .map(|w| w.0)
                .unwrap_or(0);
            queue.set_next_avail(used);
            queue.set_next_used(used);
            self.fallback.push(queue);
        }
        self.fail_pending_requests();
    }

    /// Completes every posted request with an I/O error and interrupts the
    /// guest; called on each kick once the backend is gone.
    pub fn fail_pending_requests(&mut self) {
        let mem = self.queues.mem();
        for (queue, call) in self.fallback.iter_mut().zip(self.queues.call_fds()) {
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

impl VhostUserDevice for VhostUserBlock {
    fn queues(&self) -> &VhostUserQueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut VhostUserQueues {
        &mut self.queues
    }

    fn give_up(&mut self) {
        self.take_over_queues();
    }
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        if self.queues.is_given_up() {
            data.fill(0);
            return;
        }
        let max_queues = self.queue_sizes.len() as u16;
        let result = self
            .queues
            .read_config(CONFIG_SPACE_LEN, offset, data, |space| {
                // The guest may use only the queues this frontend set up,
                // whatever the backend could serve.
                let backend_queues = u16::from_le_bytes([space[34], space[35]]);
                let queues = backend_queues.min(max_queues).max(1);
                space[34..36].copy_from_slice(&queues.to_le_bytes());
            });
        if let Err(err) = result {
            self.queues.backend_failed("config read", err);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.queues.is_given_up() || offset > 255 {
            return;
        }
        if let Err(err) = self.queues.write_config(offset as u32, data) {
            self.queues.backend_failed("config write", err);
        }
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        self.acked_features = acked_features;
        self.layouts = queues.to_vec();
        if let Err(err) = self
            .queues
            .activate_for_guest(acked_features, queues, QUEUE_SIZE)
        {
            self.layouts.clear();
            return Err(err);
        }
        crate::guest_log_here!(
            log::Level::Info,
            "{}: active with {} queue(s)",
            self.queues.device(),
            queues.len()
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.layouts.clear();
        self.fallback.clear();
        self.queues.reset_for_guest();
    }
}
