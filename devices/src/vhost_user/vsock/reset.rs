//! The TRANSPORT_RESET event a loaded snapshot owes the guest: its
//! connections ended with the old backend (the host side of each was a
//! socket of that process), so the driver must drop them, as Firecracker
//! tells it on restore. The VMM posts the event itself, before the new
//! backend takes the event queue over from its used index.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::vhost_user::DirtyLog;
use crate::virtio::QueueLayout;

/// virtio-vsock's `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// The event's size: its id.
const EVENT_LEN: u32 = 4;

/// Puts one TRANSPORT_RESET in the first buffer the guest posted on the
/// event queue laid out as `layout`; false if it posted none. The caller
/// raises the queue's interrupt. What it writes is marked in `log`.
pub fn post_transport_reset(
    mem: &GuestMemoryMmap,
    layout: &QueueLayout,
    max_size: u16,
    log: Option<&DirtyLog>,
) -> Result<bool, String> {
    let mut queue = Queue::new(max_size).map_err(|e| e.to_string())?;
    queue.try_set_size(layout.size).map_err(|e| e.to_string())?;
    queue
        .try_set_desc_table_address(layout.desc_table)
        .map_err(|e| e.to_string())?;
    queue
        .try_set_avail_ring_address(layout.avail_ring)
        .map_err(|e| e.to_string())?;
    queue
        .try_set_used_ring_address(layout.used_ring)
        .map_err(|e| e.to_string())?;
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err("the event queue lies outside guest memory".into());
    }
    let used = queue
        .used_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|e| e.to_string())?;
    queue.set_next_avail(used.0);
    queue.set_next_used(used.0);
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Ok(false);
    };
    let head = chain.head_index();
    let buffer = chain
        .into_iter()
        .find(|d| d.is_write_only() && d.len() >= EVENT_LEN)
        .ok_or("the event buffer is not writable or too short")?;
    mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), buffer.addr())
        .map_err(|e| e.to_string())?;
    queue
        .add_used(mem, head, EVENT_LEN)
        .map_err(|e| e.to_string())?;
    if let Some(log) = log {
        log.mark(buffer.addr(), EVENT_LEN as usize);
        log.mark_used_ring(layout);
    }
    Ok(true)
}
