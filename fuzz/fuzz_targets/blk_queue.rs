//! vhost-user-blk's worker on a queue that a hostile guest laid out: the
//! real backend's event handler (descriptor chains, the request parser and
//! planner, the I/O engine, the used ring) over guest memory from the
//! input, on a small memfd disk (served through its mapping) or a file on
//! disk. A hang here is a guest spinning a worker.
//! Optionally the frontend hands over an inflight region in which an
//! earlier backend left requests in flight (any heads, counters and used
//! index): the worker resubmits them before taking new ones.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;
use vhost_user_backend::{VhostUserBackend, VringT};
use vhost_user_blk::backend::{BackendConfig, BlockBackend};
use vhost_user_blk::disk::Disk;
use vhost_user_common::device::Served;
use vhost_user_common::BackendVring;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    io_uring: bool,
    read_only: bool,
    disk_sectors: u8,
    /// The disk is a file on a disk-backed file system (a request alone is
    /// tried in place with RWF_NOWAIT, requests posted together go to the
    /// ring together) rather than in memory (always in place).
    on_disk: bool,
    features: u64,
    left_in_flight: Option<LeftInFlight>,
}

/// What an earlier backend left in queue 0's part of the inflight region
/// (QEMU's layout: a 16-byte header, then 16 bytes per descriptor).
#[derive(Arbitrary, Debug)]
struct LeftInFlight {
    version: u16,
    last_batch_head: u16,
    used_idx: u16,
    /// (head, counter): marked in flight.
    marks: Vec<(u8, u64)>,
}

/// Hands `backend` a region holding `left` (as SET_INFLIGHT_FD would).
fn hand_over(backend: &Served<BlockBackend>, left: &LeftInFlight) {
    let asked = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 256,
    };
    let Ok((region, file)) = backend.get_inflight_fd(&asked) else {
        return;
    };
    let _ = file.write_all_at(&left.version.to_le_bytes(), 8);
    let _ = file.write_all_at(&left.last_batch_head.to_le_bytes(), 12);
    let _ = file.write_all_at(&left.used_idx.to_le_bytes(), 14);
    for (head, counter) in &left.marks {
        let at = 16 + u64::from(*head) * 16;
        let _ = file.write_all_at(&[1], at);
        let _ = file.write_all_at(&counter.to_le_bytes(), at + 8);
    }
    let _ = backend.set_inflight_fd(&region, file);
}

fn memfd_disk(sectors: u64, read_only: bool) -> Option<Disk> {
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the memfd was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Allocated, not only sized: an image in memory with no holes is
    // served through its mapping (vhost-user-blk's `mapping` module).
    // SAFETY: allocates the memfd owned here.
    if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&fd), 0, 0, (sectors * 512) as i64) } != 0
    {
        return None;
    }
    Disk::from_fd(fd, read_only, false).ok()
}

/// An unnamed file in /var/tmp, which is not tmpfs on the machines the
/// fuzz smoke runs on (were it, the disk is in memory, as with a memfd).
fn file_disk(sectors: u64, read_only: bool) -> Option<Disk> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open("/var/tmp")
        .ok()?;
    file.set_len(sectors * 512).ok()?;
    Disk::from_fd(file.into(), read_only, false).ok()
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryAtomic::new(input.ring.memory());
    let sectors = u64::from(input.disk_sectors % 64) + 1;
    let disk = if input.on_disk {
        file_disk(sectors, input.read_only)
    } else {
        memfd_disk(sectors, input.read_only)
    };
    let Some(disk) = disk else {
        return;
    };
    let config = BackendConfig {
        queues: 1,
        threads: 1,
        queue_size: 256,
        poll: Duration::ZERO,
        serial: b"fuzz".to_vec(),
        io_uring: input.io_uring,
        seccomp: tessera_seccomp::Filters::disabled(),
        stats: backend_stats::Stats::private(),
    };
    let Ok(backend) = BlockBackend::new(disk, config, mem.clone()) else {
        return;
    };
    let backend = Served(std::sync::Arc::new(backend));
    backend.acked_features(input.features);
    if let Some(left) = &input.left_in_flight {
        hand_over(&backend, left);
    }
    backend.set_event_idx(input.ring.event_idx);
    let Ok(vring) = BackendVring::new(mem, 256) else {
        return;
    };
    let addrs = input.ring.addrs();
    vring.set_queue_size(addrs.size);
    if vring
        .set_queue_info(addrs.desc.0, addrs.avail.0, addrs.used.0)
        .is_err()
    {
        return;
    }
    vring.set_queue_next_avail(input.ring.next_avail);
    vring.set_queue_next_used(input.ring.next_used);
    vring.set_queue_event_idx(input.ring.event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let _ = backend.handle_event(0, EventSet::IN, &[vring], 0);
});
