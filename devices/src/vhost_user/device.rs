//! One shape for every vhost-user device: [`VhostUser`] holds what every
//! kind shares (the queues and the backend connection, the features
//! offered to the guest, the queue sizes) and implements the virtio
//! transport's [`VirtioDevice`] once; a kind adds only what is its own, as
//! a [`DeviceModel`]: its virtio id, its config space, and what it does on
//! activation, reset and when its backend is gone for good.

use super::{VhostUserDevice, VhostUserQueues};
use crate::virtio::{ActivateError, QueueEventfds, QueueLayout, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

/// Entries per queue the guest may use, on every kind of device.
pub const QUEUE_SIZE: u16 = 256;

/// What the guest's driver set up when it started the device.
#[derive(Debug, Clone, Copy)]
pub struct DriverSetup<'a> {
    /// The features it acknowledged.
    pub acked_features: u64,
    /// Its queues, by index.
    pub layouts: &'a [QueueLayout],
}

/// What one kind of vhost-user device adds to the queues every kind
/// shares. Each call gets those queues.
pub trait DeviceModel: Send {
    /// The virtio device id.
    const DEVICE_TYPE: u32;
    /// Whether the config space comes from the backend (it reads as zeros
    /// once the device is given up), rather than from the VMM.
    const CONFIG_FROM_BACKEND: bool = true;

    /// A guest read of the config space.
    fn read_config(&mut self, queues: &mut VhostUserQueues, offset: u64, data: &mut [u8]);

    /// A guest write of the config space; most kinds' are read-only.
    fn write_config(&mut self, _queues: &mut VhostUserQueues, _offset: u64, _data: &[u8]) {}

    /// Starts the device with what the driver set up.
    fn activate(
        &mut self,
        queues: &mut VhostUserQueues,
        driver: DriverSetup<'_>,
    ) -> Result<(), ActivateError>;

    /// Stops the device after a driver reset.
    fn reset(&mut self, queues: &mut VhostUserQueues) {
        queues.reset_for_guest();
    }

    /// No backend will come back: says what becomes of the guest's
    /// requests (and does it).
    fn give_up(&mut self, queues: &mut VhostUserQueues);

    /// The (notification, interrupt) eventfds of the queues the VMM
    /// serves itself, which follow the backend's.
    fn own_queue_eventfds(&self) -> Vec<(&EventFd, &EventFd)> {
        Vec::new()
    }
}

/// A virtio device of kind `M` whose queues a vhost-user backend serves.
pub struct VhostUser<M> {
    pub(super) queues: VhostUserQueues,
    /// Offered to the guest.
    features: u64,
    queue_sizes: Vec<u16>,
    pub(super) model: M,
}

impl<M: DeviceModel> VhostUser<M> {
    /// A device offering `features` on `queue_count` queues of
    /// [`QUEUE_SIZE`] (the backend's and any the VMM serves itself).
    pub(super) fn with_model(
        queues: VhostUserQueues,
        features: u64,
        queue_count: usize,
        model: M,
    ) -> Self {
        Self {
            queues,
            features,
            queue_sizes: vec![QUEUE_SIZE; queue_count],
            model,
        }
    }
}

impl<M: DeviceModel> VirtioDevice for VhostUser<M> {
    fn device_type(&self) -> u32 {
        M::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        if M::CONFIG_FROM_BACKEND && self.queues.is_given_up() {
            data.fill(0);
            return;
        }
        self.model.read_config(&mut self.queues, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self.queues.is_given_up() {
            self.model.write_config(&mut self.queues, offset, data);
        }
    }

    fn activate(
        &mut self,
        acked_features: u64,
        layouts: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        let driver = DriverSetup {
            acked_features,
            layouts,
        };
        self.model.activate(&mut self.queues, driver)
    }

    fn reset(&mut self) {
        self.model.reset(&mut self.queues);
    }
}

impl<M: DeviceModel> QueueEventfds for VhostUser<M> {
    fn queue_eventfds(&self) -> Vec<(&EventFd, &EventFd)> {
        let backend = self.queues.kick_fds().iter().zip(self.queues.call_fds());
        backend.chain(self.model.own_queue_eventfds()).collect()
    }
}

impl<M: DeviceModel> VhostUserDevice for VhostUser<M> {
    fn queues(&self) -> &VhostUserQueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut VhostUserQueues {
        &mut self.queues
    }

    fn give_up(&mut self) {
        self.model.give_up(&mut self.queues);
    }
}
