//! The VMM's half of a vhost-user block device: what the guest's driver
//! sees through the MMIO transport (features, config space), turned into
//! backend setup on activation.

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::vhost_user::{FrontendError, VhostUserFrontend};
use crate::virtio::{ActivateError, QueueLayout, VirtioDevice};

/// The virtio device id of block devices.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Entries per queue the guest may use.
pub const QUEUE_SIZE: u16 = 256;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Transport and ring features the VMM passes through to the guest.
const PASSTHROUGH_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << 28 | 1 << 29;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlockError {
    #[error("drive {id}: {source}")]
    Frontend { id: String, source: FrontendError },
    #[error("drive {id}: cannot create an eventfd: {source}")]
    EventFd { id: String, source: std::io::Error },
    #[error("drive {id}: the backend does not offer VIRTIO_F_VERSION_1")]
    NotVirtio1 { id: String },
}

/// A virtio-blk device whose queues a vhost-user backend serves.
pub struct VhostUserBlock {
    id: String,
    frontend: VhostUserFrontend,
    mem: GuestMemoryMmap,
    features: u64,
    queue_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    active_queues: usize,
    failed: bool,
}

impl VhostUserBlock {
    /// Wraps a negotiated frontend; creates one kick and one call eventfd
    /// per queue, for the caller to register as ioeventfds and irqfds.
    pub fn new(
        id: &str,
        frontend: VhostUserFrontend,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VhostUserBlockError> {
        let features = frontend.backend_features();
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserBlockError::NotVirtio1 { id: id.into() });
        }
        let queues = frontend.queue_num();
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VhostUserBlockError::EventFd {
                id: id.into(),
                source,
            })
        };
        let kicks = (0..queues)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        let calls = (0..queues)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            id: id.to_string(),
            frontend,
            mem,
            // Block features pass through; transport features only if we
            // support them in this transport.
            features: features & ((0xffff_ffff & !(0xf << 28)) | PASSTHROUGH_FEATURES),
            queue_sizes: vec![QUEUE_SIZE; queues],
            kicks,
            calls,
            active_queues: 0,
            failed: false,
        })
    }

    /// The drive id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Each queue's kick eventfd, for ioeventfd registration.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Each queue's call eventfd, for irqfd registration.
    pub fn call_fds(&self) -> &[EventFd] {
        &self.calls
    }

    /// The backend socket, to watch for hang-ups.
    pub fn backend_fd(&self) -> std::os::fd::RawFd {
        self.frontend.socket_fd()
    }

    fn backend_failed(&mut self, what: &str, err: FrontendError) {
        if !self.failed {
            log::error!("drive {}: the backend failed ({what}): {err}", self.id);
        }
        self.failed = true;
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
        data.fill(0);
        if self.failed || offset > 255 || data.len() > 256 {
            return;
        }
        match self.frontend.get_config(offset as u32, data.len() as u32) {
            Ok(payload) if payload.len() == data.len() => data.copy_from_slice(&payload),
            Ok(payload) => log::warn!(
                "drive {}: config read of {} bytes got {}",
                self.id,
                data.len(),
                payload.len()
            ),
            Err(err) => self.backend_failed("config read", err),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.failed || offset > 255 {
            return;
        }
        if let Err(err) = self.frontend.set_config(offset as u32, data) {
            self.backend_failed("config write", err);
        }
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        if self.failed {
            return Err(ActivateError::Backend(format!(
                "drive {}: the backend is gone",
                self.id
            )));
        }
        self.frontend
            .activate(
                &self.mem,
                acked_features,
                queues,
                QUEUE_SIZE,
                &self.kicks,
                &self.calls,
            )
            .map_err(|err| ActivateError::Backend(format!("drive {}: {err}", self.id)))?;
        self.active_queues = queues.len();
        log::info!("drive {}: active with {} queue(s)", self.id, queues.len());
        Ok(())
    }

    fn reset(&mut self) {
        if self.failed {
            return;
        }
        if let Err(err) = self.frontend.deactivate(self.active_queues) {
            self.backend_failed("reset", err);
        }
        self.active_queues = 0;
    }
}
