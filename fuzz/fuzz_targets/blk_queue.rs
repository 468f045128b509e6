//! vhost-user-blk's worker on a queue that a hostile guest laid out: the
//! real backend's event handler (descriptor chains, the request parser and
//! planner, the I/O engine, the used ring) over guest memory from the
//! input, on a small memfd disk. A hang here is a guest spinning a worker.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tessera_fuzz::GuestRing;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vhost_user_blk::backend::{BackendConfig, BlockBackend};
use vhost_user_blk::disk::Disk;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

#[derive(Arbitrary, Debug)]
struct Input {
    ring: GuestRing,
    io_uring: bool,
    read_only: bool,
    disk_sectors: u8,
    features: u64,
}

fn memfd_disk(sectors: u64, read_only: bool) -> Option<Disk> {
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the memfd was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes the memfd owned here.
    if unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), (sectors * 512) as i64) } != 0
    {
        return None;
    }
    Disk::from_fd(fd, read_only, false).ok()
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryAtomic::new(input.ring.memory());
    let Some(disk) = memfd_disk(u64::from(input.disk_sectors % 64) + 1, input.read_only) else {
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
    };
    let Ok(backend) = BlockBackend::new(disk, config, mem.clone()) else {
        return;
    };
    backend.acked_features(input.features);
    backend.set_event_idx(input.ring.event_idx);
    let Ok(vring) = VringRwLock::<GuestMemoryAtomic<GuestMemoryMmap>>::new(mem, 256) else {
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
