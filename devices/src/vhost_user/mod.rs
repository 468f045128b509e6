//! vhost-user devices: the VMM's side of devices served by separate backend
//! processes. The frontend shares guest memory with the backend and hands it
//! each queue's kick and call eventfds; after that the guest and the backend
//! talk directly (ioeventfd and irqfd) and the VMM is out of the data path.

pub mod blk;
pub mod features;
mod frontend;
pub mod net;
mod queues;
pub mod vsock;
pub mod watchdog;

pub use frontend::{FrontendError, InflightRegion, VhostUserFrontend};
pub use queues::VhostUserQueues;

use crate::virtio::VirtioDevice;

/// A device whose queues a vhost-user backend serves, as the VMM's backend
/// monitor sees it: when the backend is gone, the monitor marks the queues
/// disconnected and hands them a new backend, or gives the device up.
pub trait VhostUserDevice: VirtioDevice + Send {
    /// The drive or interface id.
    fn id(&self) -> &str;
    /// The queues and the backend connection.
    fn queues(&self) -> &VhostUserQueues;
    fn queues_mut(&mut self) -> &mut VhostUserQueues;
    /// No backend will come back: the device stops using one for good.
    fn give_up(&mut self);
    /// Whether the device was given up.
    fn is_given_up(&self) -> bool;
}
