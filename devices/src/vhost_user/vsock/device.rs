//! The VMM's half of a vhost-user vsock device: what the guest's driver
//! sees through the MMIO transport (features, the guest CID in the config
//! space), turned into backend setup on activation. Every queue (RX, TX,
//! event) goes to the backend; the VMM answers the config space itself,
//! since it knows the CID, so the guest reads it even without a backend.

use crate::vhost_user::{
    features, FrontendError, VhostUserDevice, VhostUserFrontend, VhostUserQueues,
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

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    #[error("vsock {id}: {source}")]
    Frontend { id: String, source: FrontendError },
    #[error("vsock {id}: the backend does not offer VIRTIO_F_VERSION_1")]
    NotVirtio1 { id: String },
    #[error("vsock {id}: the backend serves {count} queue(s); a vsock device needs {NUM_QUEUES}")]
    Queues { id: String, count: usize },
}

/// A virtio-vsock device whose queues a vhost-user backend serves.
pub struct VhostUserVsock {
    id: String,
    guest_cid: u64,
    queues: VhostUserQueues,
    features: u64,
    queue_sizes: Vec<u16>,
    failed: bool,
}

impl VhostUserVsock {
    /// Wraps a negotiated frontend; creates one kick and one call eventfd
    /// per queue, for the caller to register as ioeventfds and irqfds.
    pub fn new(
        id: &str,
        guest_cid: u64,
        frontend: VhostUserFrontend,
        mem: vm_memory::GuestMemoryMmap,
    ) -> Result<Self, VhostUserVsockError> {
        let features = frontend.backend_features();
        if features & features::VERSION_1 == 0 {
            return Err(VhostUserVsockError::NotVirtio1 { id: id.into() });
        }
        let count = frontend.queue_num();
        if count < NUM_QUEUES {
            return Err(VhostUserVsockError::Queues {
                id: id.into(),
                count,
            });
        }
        let queues = VhostUserQueues::new(frontend, mem, NUM_QUEUES, CONFIG_SPACE_LEN).map_err(
            |source| VhostUserVsockError::Frontend {
                id: id.into(),
                source,
            },
        )?;
        Ok(Self {
            id: id.to_string(),
            guest_cid,
            queues,
            features: features::offered_to_guest(features),
            queue_sizes: vec![QUEUE_SIZE; NUM_QUEUES],
            failed: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    fn backend_failed(&mut self, what: &str, err: FrontendError) {
        let label = format!("vsock {}", self.id);
        self.queues.call_failed(&label, what, err);
    }
}

impl VhostUserDevice for VhostUserVsock {
    fn id(&self) -> &str {
        &self.id
    }

    fn queues(&self) -> &VhostUserQueues {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut VhostUserQueues {
        &mut self.queues
    }

    /// Nothing waits on the device in the VMM: the guest's connections
    /// simply time out.
    fn give_up(&mut self) {
        if !self.failed {
            log::error!(
                "vsock {}: no backend; the guest's connections are no longer carried",
                self.id
            );
        }
        self.failed = true;
    }

    fn is_given_up(&self) -> bool {
        self.failed
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
        if self.failed {
            return Err(ActivateError::Backend(format!(
                "vsock {}: the backend is gone",
                self.id
            )));
        }
        match self.queues.start(acked_features, queues, QUEUE_SIZE) {
            Err(err) if err.is_disconnect() => self.backend_failed("activation", err),
            Err(err) => {
                return Err(ActivateError::Backend(format!("vsock {}: {err}", self.id)));
            }
            Ok(()) => {}
        }
        crate::guest_log_here!(
            log::Level::Info,
            "vsock {}: active, guest CID {}",
            self.id,
            self.guest_cid
        );
        Ok(())
    }

    fn reset(&mut self) {
        if self.failed {
            return;
        }
        if let Err(err) = self.queues.stop() {
            self.backend_failed("reset", err);
        }
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
