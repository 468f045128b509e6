//! What Tessera's vhost-user backends share: their common flags ([`cli`]),
//! the life of a backend process, from its socket and seccomp filters to
//! its exit status ([`process`]), the one `VhostUserBackend` every device
//! is served by ([`device`]), taking requests from a guest's split
//! virtqueue without trusting the guest ([`ring`]), the helpers of a
//! device's workers ([`worker`]), and logging what a guest can trigger
//! without letting it flood the log ([`ratelimit`]).

pub mod cli;
pub mod device;
pub mod process;
pub mod ratelimit;
pub mod ring;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod worker;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as every backend maps it. Each region carries the dirty
/// log a frontend may share (SET_LOG_BASE), so that every write into it
/// through vm-memory marks its page for the frontend's Diff snapshots; a
/// write through a raw host pointer must mark it itself.
pub type BackendMemory = GuestMemoryMmap<BitmapMmapRegion>;

/// A queue as every backend holds it, over [`BackendMemory`].
pub type BackendVring = VringRwLock<GuestMemoryAtomic<BackendMemory>>;
