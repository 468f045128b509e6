//! The VMM's half of a vhost-user network device: the feature set and the
//! configuration space the guest's driver sees, turned into backend setup
//! on activation. Frames never pass through the VMM.

use vm_memory::GuestMemoryMmap;

use crate::vhost_user::{FrontendError, VhostUserFrontend, VhostUserQueues};
use crate::virtio::{ActivateError, QueueLayout, VirtioDevice};

/// The virtio device id of network devices.
pub const VIRTIO_ID_NET: u32 = 1;
/// mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
const CONFIG_SPACE_LEN: usize = 12;
/// Entries per queue the guest may use.
pub const QUEUE_SIZE: u16 = 256;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Transport and ring features the VMM passes through to the guest.
const PASSTHROUGH_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << 28 | 1 << 29;
/// VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ: multiqueue needs a control
/// queue, which this frontend does not serve yet, so the guest gets one pair.
const UNSERVED_FEATURES: u64 = 1 << 17 | 1 << 22;
/// One receive and one transmit queue.
const QUEUES: usize = 2;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error("interface {id}: cannot create an eventfd: {source}")]
    EventFd { id: String, source: std::io::Error },
    #[error("interface {id}: the backend does not offer VIRTIO_F_VERSION_1")]
    NotVirtio1 { id: String },
    #[error("interface {id}: the backend serves {queues} queue(s), a pair is needed")]
    TooFewQueues { id: String, queues: usize },
}

/// A virtio-net device whose queues a vhost-user backend serves.
pub struct VhostUserNet {
    id: String,
    queues: VhostUserQueues,
    features: u64,
    queue_sizes: Vec<u16>,
    /// `guest_mac`: the VMM's word wins over the backend's, so that an
    /// external backend's guest gets the address it was configured with.
    mac: Option<[u8; 6]>,
    /// Features the VMM offers on its own (MAC for a backend without one):
    /// never passed to the backend, which would refuse them.
    vmm_features: u64,
    failed: bool,
}

impl VhostUserNet {
    /// Wraps a negotiated frontend; creates the kick and call eventfds of
    /// one queue pair, for the caller to register as ioeventfds and irqfds.
    /// With `mac` the guest gets that address whatever the backend says.
    pub fn new(
        id: &str,
        frontend: VhostUserFrontend,
        mem: GuestMemoryMmap,
        mac: Option<[u8; 6]>,
    ) -> Result<Self, VhostUserNetError> {
        let features = frontend.backend_features();
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserNetError::NotVirtio1 { id: id.into() });
        }
        if frontend.queue_num() < QUEUES {
            return Err(VhostUserNetError::TooFewQueues {
                id: id.into(),
                queues: frontend.queue_num(),
            });
        }
        let mut features =
            features & ((0xffff_ffff & !(0xf << 28) & !UNSERVED_FEATURES) | PASSTHROUGH_FEATURES);
        let vmm_features = match mac {
            Some(_) => VIRTIO_NET_F_MAC & !features,
            None => 0,
        };
        features |= vmm_features;
        let queues = VhostUserQueues::new(frontend, mem, QUEUES).map_err(|source| {
            VhostUserNetError::EventFd {
                id: id.into(),
                source,
            }
        })?;
        Ok(Self {
            id: id.to_string(),
            queues,
            features,
            queue_sizes: vec![QUEUE_SIZE; QUEUES],
            mac,
            vmm_features,
            failed: false,
        })
    }

    /// The interface id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The queues' eventfds and the backend connection.
    pub fn queues(&self) -> &VhostUserQueues {
        &self.queues
    }

    /// The backend is gone. Unlike a disk, nothing waits on a network
    /// queue: the guest's frames are simply no longer carried.
    pub fn backend_failed(&mut self, what: &str, err: Option<FrontendError>) {
        if !self.failed {
            match err {
                Some(err) => {
                    log::error!("interface {}: the backend failed ({what}): {err}", self.id)
                }
                None => log::error!("interface {}: the backend is gone ({what})", self.id),
            }
        }
        self.failed = true;
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        if self.failed {
            data.fill(0);
            return;
        }
        let mac = self.mac;
        let result = self
            .queues
            .read_config(CONFIG_SPACE_LEN, offset, data, |space| {
                if let Some(mac) = mac {
                    space[0..6].copy_from_slice(&mac);
                }
                // One queue pair, whatever the backend could serve.
                space[8..10].copy_from_slice(&1u16.to_le_bytes());
            });
        if let Err(err) = result {
            self.backend_failed("config read", Some(err));
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // virtio-net's configuration space is read-only for the driver.
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        if self.failed {
            return Err(ActivateError::Backend(format!(
                "interface {}: the backend is gone",
                self.id
            )));
        }
        self.queues
            .start(acked_features & !self.vmm_features, queues, QUEUE_SIZE)
            .map_err(|err| ActivateError::Backend(format!("interface {}: {err}", self.id)))?;
        log::info!("interface {}: active", self.id);
        Ok(())
    }

    fn reset(&mut self) {
        if self.failed {
            return;
        }
        if let Err(err) = self.queues.stop() {
            self.backend_failed("reset", Some(err));
        }
    }
}
