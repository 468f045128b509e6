//! The VMM's half of a vhost-user vsock device: what the guest's driver
//! sees through the MMIO transport (features, the guest CID in the config
//! space), turned into backend setup on activation. Every queue (RX, TX,
//! event) goes to the backend; the VMM answers the config space itself,
//! since it knows the CID, so the guest reads it even without a backend.

use crate::vhost_user::{
    features, DeviceKind, DeviceName, VhostUserDevice, VhostUserDeviceError, VhostUserFrontend,
    VhostUserQueues,
};
use crate::virtio::{ActivateError, QueueLayout, VirtioDevice};

/// The virtio device id of socket devices.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// virtio-vsock's configuration space: `guest_cid`, 64 bits.
const CONFIG_SPACE_LEN: usize = 8;
/// RX, TX and event.
const NUM_QUEUES: usize = 3;
/// Entries per queue the guest may use.
pub const QUEUE_SIZE: u16 = 256;

/// A virtio-vsock device whose queues a vhost-user backend serves.
pub struct VhostUserVsock {
    guest_cid: u64,
    queues: VhostUserQueues,
    features: u64,
    queue_sizes: Vec<u16>,
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
        Ok(Self {
            guest_cid,
            queues,
            features,
            queue_sizes: vec![QUEUE_SIZE; NUM_QUEUES],
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }
}

impl VhostUserDevice for VhostUserVsock {
    fn queues(&self) -> &VhostUserQueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut VhostUserQueues {
        &mut self.queues
    }

    /// Nothing waits on the device in the VMM: the guest's connections
    /// simply time out.
    fn give_up(&mut self) {
        self.queues
            .give_up("the guest's connections are no longer carried");
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

impl VirtioDevice for VhostUserVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        read_cid(self.guest_cid, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // virtio-vsock's configuration space is read-only for the driver.
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        self.queues
            .activate_for_guest(acked_features, queues, QUEUE_SIZE)?;
        crate::guest_log_here!(
            log::Level::Info,
            "{}: active, guest CID {}",
            self.queues.device(),
            self.guest_cid
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.reset_for_guest();
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
