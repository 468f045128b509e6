//! vhost-user devices: the VMM's side of devices served by separate backend
//! processes. The frontend shares guest memory with the backend and hands it
//! each queue's kick and call eventfds; after that the guest and the backend
//! talk directly (ioeventfd and irqfd) and the VMM is out of the data path.

pub mod blk;
mod frontend;
pub mod net;
mod queues;
pub mod watchdog;

pub use frontend::{FrontendError, VhostUserFrontend};
pub use queues::VhostUserQueues;
