//! A backend marks every page it writes into guest memory in the dirty log
//! the VMM's frontend shares (SET_LOG_BASE), which a Diff snapshot needs:
//! KVM's log cannot see a block read land in the guest. Tessera's own
//! frontend drives a real `vhost-user-blk` here, with no VMM and no guest.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devices::vhost_user::{DeviceKind, DeviceName, DirtyLog, QueueSetup, VhostUserFrontend};
use devices::virtio::QueueLayout;
use tessera_tests::{workspace_bin, Running};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const UNTOUCHED: u64 = 0x4_0000;
const DISK_BYTE: u8 = 0x5a;

fn shared_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(c"dirty-log-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new fd nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn set_desc(mem: &GuestMemoryMmap, index: u64, addr: u64, len: u32, flags: u32, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * index))
        .unwrap();
}

/// A `vhost-user-blk` on a disk of `DISK_BYTE`s and Tessera's frontend,
/// negotiated with it.
fn backend(dir: &std::path::Path) -> (Running, VhostUserFrontend) {
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![DISK_BYTE; 1 << 20]).unwrap();
    let socket = dir.join("blk.sock");
    let mut command = Command::new(workspace_bin("vhost-user-blk"));
    command
        .arg("--socket")
        .arg(&socket)
        .arg("--path")
        .arg(&image)
        .env_remove("RUST_LOG");
    let backend = Running::spawn(command);
    assert!(tessera_tests::wait_for_listener(
        &socket,
        Duration::from_secs(10)
    ));
    let frontend = VhostUserFrontend::connect(&socket, 1).unwrap();
    assert!(frontend.can_log(), "vhost-user-blk offers no dirty log");
    (backend, frontend)
}

/// Starts queue 0 with `log` (or none).
fn activate(
    frontend: &mut VhostUserFrontend,
    mem: &GuestMemoryMmap,
    (kick, call): (&EventFd, &EventFd),
    log: Option<&DirtyLog>,
) {
    let layout = QueueLayout {
        size: QUEUE_SIZE,
        desc_table: GuestAddress(DESC_TABLE),
        avail_ring: GuestAddress(AVAIL_RING),
        used_ring: GuestAddress(USED_RING),
    };
    let setup = QueueSetup {
        mem,
        acked_features: 1 << VIRTIO_F_VERSION_1,
        queues: &[layout],
        queue_max_size: QUEUE_SIZE,
        kicks: std::slice::from_ref(kick),
        calls: std::slice::from_ref(call),
        resume: false,
        log,
        page_faults: None,
    };
    frontend
        .activate(&DeviceName::new(DeviceKind::Drive, "data"), &setup)
        .unwrap();
}

/// Request `n` (0, 1, ...): VIRTIO_BLK_T_IN of sector 0 into the page at
/// `data`, its status byte at `STATUS + n`; waits for it to complete.
fn read_sector_0(mem: &GuestMemoryMmap, kick: &EventFd, n: u16, data: u64) {
    let head = 3 * n;
    let status = STATUS + u64::from(n);
    mem.write_slice(&[0u8; 16], GuestAddress(HEADER)).unwrap();
    set_desc(
        mem,
        u64::from(head),
        HEADER,
        16,
        VRING_DESC_F_NEXT,
        head + 1,
    );
    set_desc(
        mem,
        u64::from(head + 1),
        data,
        4096,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        head + 2,
    );
    set_desc(mem, u64::from(head + 2), status, 1, VRING_DESC_F_WRITE, 0);
    mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(n)))
        .unwrap();
    mem.store(
        (n + 1).to_le(),
        GuestAddress(AVAIL_RING + 2),
        Ordering::Release,
    )
    .unwrap();
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem
        .load::<u16>(GuestAddress(USED_RING + 2), Ordering::Acquire)
        .unwrap()
        != n + 1
    {
        assert!(Instant::now() < deadline, "read {n} never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut bytes = [0u8; 4096];
    mem.read_slice(&mut bytes, GuestAddress(data)).unwrap();
    assert!(bytes.iter().all(|&b| b == DISK_BYTE));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

#[test]
fn a_block_read_into_the_guest_is_in_the_dirty_log_and_nothing_it_only_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_backend, mut frontend) = backend(dir.path());
    let mem = shared_memory();
    let log = DirtyLog::new(MEM_SIZE as u64).unwrap();
    let (kick, call) = (eventfd(), eventfd());
    activate(&mut frontend, &mem, (&kick, &call), Some(&log));
    read_sector_0(&mem, &kick, 0, DATA);
    for (addr, what) in [
        (DATA, "the data the disk filled"),
        (STATUS, "the status byte"),
        (USED_RING, "the used ring"),
    ] {
        assert!(log.is_marked(GuestAddress(addr)), "{what} is not logged");
    }
    for (addr, what) in [
        (HEADER, "the header it only read"),
        (DESC_TABLE, "the descriptor table"),
        (UNTOUCHED, "a page nobody wrote"),
    ] {
        assert!(!log.is_marked(GuestAddress(addr)), "{what} is logged");
    }
}

/// What a migration of a microVM booted without dirty tracking does: the
/// backend serving the queue is told to log from then on, without a
/// restart of its queues.
#[test]
fn a_running_backend_logs_its_writes_from_when_it_is_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let (_backend, mut frontend) = backend(dir.path());
    let mem = shared_memory();
    let log = DirtyLog::new(MEM_SIZE as u64).unwrap();
    let (kick, call) = (eventfd(), eventfd());
    activate(&mut frontend, &mem, (&kick, &call), None);
    read_sector_0(&mem, &kick, 0, DATA);
    assert!(!log.is_marked(GuestAddress(DATA)));
    frontend
        .start_logging(&log, 1 << VIRTIO_F_VERSION_1)
        .unwrap();
    read_sector_0(&mem, &kick, 1, UNTOUCHED);
    assert!(
        log.is_marked(GuestAddress(UNTOUCHED)),
        "the read after the switch is not logged"
    );
    assert!(log.is_marked(GuestAddress(USED_RING)));
    assert!(
        !log.is_marked(GuestAddress(DATA)),
        "the read before the switch is logged"
    );
}
