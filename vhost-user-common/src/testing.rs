//! Test support for the backends' unit tests (feature `test-utils`): a
//! vring that vhost-user-backend's workers would be handed after a
//! frontend set it up, over a queue a test lays out in guest memory.

use vhost_user_backend::VringT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryAtomic;

use crate::{BackendMemory, BackendVring};

/// A ready, enabled vring of `size` entries over `mock`'s rings, with
/// EVENT_IDX negotiated.
pub fn ready_vring(
    mem: &GuestMemoryAtomic<BackendMemory>,
    mock: &MockSplitQueue<BackendMemory>,
    size: u16,
) -> BackendVring {
    let vring = BackendVring::new(mem.clone(), size).expect("vring");
    vring.set_queue_size(size);
    vring
        .set_queue_info(
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        )
        .expect("queue addresses");
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}
