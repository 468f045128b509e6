//! The balloon device (virtio-balloon, device id 5), served by the VMM
//! itself as Firecracker's is: it moves no data, it only hands guest pages
//! back to the host. Pages the guest puts in the balloon, reports free or
//! hints free are discarded through the VMM's [`Discard`] (a hole punched
//! in the guest memory file, so that no process that maps it, backends
//! included, keeps them).
//!
//! `device.rs` is the device the transport drives (features, config
//! space, activation, the API's operations, snapshot state); `queues.rs`
//! serves the guest's queues; `pages.rs` turns page frame numbers into
//! ranges.

mod device;
mod pages;
mod queues;

pub use device::{
    Balloon, BalloonCounters, BalloonOptions, BalloonState, Discard, HintCommandError,
    BALLOON_QUEUE_SIZE, HINT_CMD_DONE, HINT_CMD_STOP, VIRTIO_ID_BALLOON,
};
pub use pages::{page_ranges, PAGE_SHIFT};
pub use queues::{MAX_PFNS_PER_TURN, STATS_TAGS};
