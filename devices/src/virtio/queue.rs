//! A virtqueue the VMM serves itself (a network device's control queue,
//! the entropy device's request queue), built from the layout the driver
//! wrote and checked against guest memory before anything reads it.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::QueueLayout;

/// Why a driver's queue layout cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum QueueLayoutError {
    #[error("cannot create a queue of size {size}: {source}")]
    Create {
        size: u16,
        source: virtio_queue::Error,
    },
    #[error("its layout is invalid ({what} at {addr:#x}): {source}")]
    Layout {
        what: &'static str,
        addr: u64,
        source: virtio_queue::Error,
    },
    #[error("it (size {size}, descriptors at {desc:#x}, avail at {avail:#x}, used at {used:#x}) does not fit in guest memory")]
    OutsideMemory {
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
}

/// The queue the driver laid out (`layout`, of at most `max_size`
/// entries), ready, if it lies in `mem`.
pub fn queue_from_layout(
    mem: &GuestMemoryMmap,
    layout: &QueueLayout,
    max_size: u16,
    event_idx: bool,
) -> Result<Queue, QueueLayoutError> {
    let mut queue = Queue::new(max_size).map_err(|source| QueueLayoutError::Create {
        size: max_size,
        source,
    })?;
    let layout_err = |what, addr: GuestAddress| {
        move |source| QueueLayoutError::Layout {
            what,
            addr: addr.0,
            source,
        }
    };
    queue
        .try_set_size(layout.size)
        .map_err(layout_err("size", GuestAddress(u64::from(layout.size))))?;
    queue
        .try_set_desc_table_address(layout.desc_table)
        .map_err(layout_err("descriptor table", layout.desc_table))?;
    queue
        .try_set_avail_ring_address(layout.avail_ring)
        .map_err(layout_err("available ring", layout.avail_ring))?;
    queue
        .try_set_used_ring_address(layout.used_ring)
        .map_err(layout_err("used ring", layout.used_ring))?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err(QueueLayoutError::OutsideMemory {
            size: layout.size,
            desc: layout.desc_table.0,
            avail: layout.avail_ring.0,
            used: layout.used_ring.0,
        });
    }
    Ok(queue)
}

/// A loaded snapshot's queue that the VMM served: every request before the
/// snapshot was answered, so the queue goes on from the used index.
pub fn take_over_at_used_index(queue: &mut Queue, mem: &GuestMemoryMmap) {
    if let Ok(used) = queue.used_idx(mem, std::sync::atomic::Ordering::Acquire) {
        queue.set_next_avail(used.0);
        queue.set_next_used(used.0);
    }
}
