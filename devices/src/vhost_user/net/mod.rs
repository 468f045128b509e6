//! virtio-net served by a `vhost-user-net` backend: the data queues go to
//! the backend, the control queue of a multi-queue device stays in the VMM.

mod ctrl;
mod device;

pub use ctrl::{CtrlQueue, CtrlQueueError, CtrlStats};
pub use device::{Net, VhostUserNet};
