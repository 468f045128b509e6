//! vhost-user devices: the VMM's side of devices served by separate backend
//! processes. The frontend shares guest memory with the backend and hands it
//! each queue's kick and call eventfds; after that the guest and the backend
//! talk directly (ioeventfd and irqfd) and the VMM is out of the data path.

pub mod blk;
mod device;
pub(crate) mod dirty_log;
pub mod features;
mod frontend;
pub mod net;
mod page_faults;
mod queues;
pub mod vsock;
pub mod watchdog;

pub use device::{DeviceModel, DriverSetup, VhostUser, QUEUE_SIZE};
pub use dirty_log::{DirtyLog, DirtyLogError};
pub use frontend::{FrontendError, InflightRegion, QueueSetup, VhostUserFrontend};
pub use page_faults::{BackendRegion, PageFaultServer};
pub use queues::{FrontendCounters, VhostUserQueues, VhostUserQueuesState};

use std::fmt;

use crate::virtio::VirtioDevice;

/// The kinds of vhost-user devices, as the API and the logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Drive,
    Interface,
    Vsock,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Drive => "drive",
            DeviceKind::Interface => "interface",
            DeviceKind::Vsock => "vsock",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One device, as errors and log lines name it: "drive rootfs".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceName {
    pub kind: DeviceKind,
    pub id: String,
}

impl DeviceName {
    pub fn new(kind: DeviceKind, id: &str) -> Self {
        Self {
            kind,
            id: id.to_string(),
        }
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}

/// Errors creating a vhost-user device of any kind.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserDeviceError {
    #[error("{device}: {source}")]
    Frontend {
        device: DeviceName,
        source: FrontendError,
    },
    #[error("{device}: the backend does not offer VIRTIO_F_VERSION_1")]
    NotVirtio1 { device: DeviceName },
    #[error("{device}: the backend serves {served} queue(s); the device needs {needed}")]
    TooFewQueues {
        device: DeviceName,
        served: usize,
        needed: usize,
    },
}

/// A device whose queues a vhost-user backend serves, as the VMM's backend
/// monitor sees it: when the backend is gone, the monitor marks the queues
/// disconnected and hands them a new backend, or gives the device up.
pub trait VhostUserDevice: VirtioDevice + Send {
    /// The queues and the backend connection.
    fn queues(&self) -> &VhostUserQueues;
    fn queues_mut(&mut self) -> &mut VhostUserQueues;
    /// No backend will come back: the device stops using one for good.
    fn give_up(&mut self);

    /// The drive, interface or vsock id.
    fn id(&self) -> &str {
        &self.queues().device().id
    }

    /// Whether the device was given up.
    fn is_given_up(&self) -> bool {
        self.queues().is_given_up()
    }
}
