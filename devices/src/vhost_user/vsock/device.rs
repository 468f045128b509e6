//! The VMM's half of a vhost-user vsock device: what the guest's driver
//! sees through the MMIO transport (features, the guest CID in the config
//! space), turned into backend setup on activation. Every queue (RX, TX,
//! event) goes to the backend; the VMM answers the config space itself,
//! since it knows the CID, so the guest reads it even without a backend.

use crate::vhost_user::{
    features, DeviceKind, DeviceModel, DeviceName, DriverSetup, VhostUser, VhostUserDeviceError,
    VhostUserFrontend, VhostUserQueues, QUEUE_SIZE,
};
use crate::virtio::ActivateError;

/// The virtio device id of socket devices.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// virtio-vsock's configuration space: `guest_cid`, 64 bits.
const CONFIG_SPACE_LEN: usize = 8;
/// RX, TX and event.
const NUM_QUEUES: usize = 3;

/// A virtio-vsock device whose queues a vhost-user backend serves.
pub type VhostUserVsock = VhostUser<Vsock>;

/// What a vsock device adds to its queues: the guest's CID.
pub struct Vsock {
    guest_cid: u64,
}

impl VhostUserVsock {
    /// Wraps a negotiated frontend; creates one kick and one call eventfd
    /// per queue, for the caller to register as ioeventfds and irqfds.
    pub fn new(
        id: &str,
        guest_cid: u64,
        frontend: VhostUserFrontend,
        mem: vm_memory::GuestMemoryMmap,
    ) -> Result<Self, VhostUserDeviceError> {
        let features = features::offered_to_guest(frontend.backend_features());
        let device = DeviceName::new(DeviceKind::Vsock, id);
        let queues = VhostUserQueues::new(device, frontend, mem, NUM_QUEUES, CONFIG_SPACE_LEN)?;
        let model = Vsock { guest_cid };
        Ok(Self::with_model(queues, features, NUM_QUEUES, model))
    }

    pub fn guest_cid(&self) -> u64 {
        self.model.guest_cid
    }
}

/// Fills `data` from the config space (`guest_cid`, little-endian) at
/// `offset`; bytes past its end read as zeros.
fn read_cid(guest_cid: u64, offset: u64, data: &mut [u8]) {
    let space = guest_cid.to_le_bytes();
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start
            .checked_add(i)
            .and_then(|at| space.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// The event queue's index.
const EVENT_QUEUE: usize = 2;

impl Vsock {
    /// A loaded snapshot: tells the guest its connections are gone (see
    /// `reset.rs`); whether the event was posted.
    fn post_transport_reset(&self, queues: &VhostUserQueues, driver: DriverSetup<'_>) -> bool {
        let Some(layout) = driver.layouts.get(EVENT_QUEUE) else {
            return false;
        };
        match super::reset::post_transport_reset(
            queues.mem(),
            layout,
            QUEUE_SIZE,
            queues.dirty_log(),
        ) {
            Ok(posted) => posted,
            Err(err) => {
                crate::guest_log_here!(
                    log::Level::Warn,
                    "{}: no TRANSPORT_RESET for the guest: {err}",
                    queues.device()
                );
                false
            }
        }
    }
}

impl DeviceModel for Vsock {
    const DEVICE_TYPE: u32 = VIRTIO_ID_VSOCK;
    /// The VMM knows the CID: the guest reads it even without a backend.
    const CONFIG_FROM_BACKEND: bool = false;

    fn read_config(&mut self, _queues: &mut VhostUserQueues, offset: u64, data: &mut [u8]) {
        read_cid(self.guest_cid, offset, data);
    }

    fn activate(
        &mut self,
        queues: &mut VhostUserQueues,
        driver: DriverSetup<'_>,
    ) -> Result<(), ActivateError> {
        // The takeover that follows interrupts the guest on every queue.
        if queues.is_restoring() {
            self.post_transport_reset(queues, driver);
        }
        queues.activate_for_guest(driver.acked_features, driver.layouts, QUEUE_SIZE)?;
        crate::guest_log_here!(
            log::Level::Info,
            "{}: active, guest CID {}",
            queues.device(),
            self.guest_cid
        );
        Ok(())
    }

    /// Nothing waits on the device in the VMM: the guest's connections
    /// simply time out.
    fn give_up(&mut self, queues: &mut VhostUserQueues) {
        queues.give_up("the guest's connections are no longer carried");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_is_the_cid_little_endian_and_zeros_past_it() {
        let cid = 0x0102_0304_0506_0708;
        let mut all = [0xffu8; 8];
        read_cid(cid, 0, &mut all);
        assert_eq!(all, [8, 7, 6, 5, 4, 3, 2, 1]);
        let mut high = [0xffu8; 4];
        read_cid(cid, 4, &mut high);
        assert_eq!(high, [4, 3, 2, 1]);
        let mut past = [0xffu8; 4];
        read_cid(cid, 6, &mut past);
        assert_eq!(past, [2, 1, 0, 0]);
        read_cid(cid, u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
    }
}
