//! The vhost-user message stream into vhost-user-blk: bytes from a hostile
//! frontend, with the fds each request carries (`tessera_fuzz::vhost_user_messages`), read by the
//! backend's real request handler (the vhost crate's, with the patched
//! vhost-user-backend and the block backend behind it) until the stream
//! ends. The handler must answer or refuse every message, and end.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::send_vhost_user_stream;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vhost_user_blk::backend::{BackendConfig, BlockBackend};
use vhost_user_blk::disk::Disk;
use vhost_user_common::device::Served;
use vhost_user_common::BackendMemory;
use vm_memory::GuestMemoryAtomic;

/// One listening socket for the whole run; each input is one connection.
fn listener() -> &'static Mutex<(Listener, std::path::PathBuf)> {
    static LISTENER: OnceLock<Mutex<(Listener, std::path::PathBuf)>> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("tessera-fuzz-blk-{}.sock", std::process::id()));
        let listener = Listener::new(&path, true).expect("listen");
        Mutex::new((listener, path))
    })
}

fn memfd_disk() -> Disk {
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: the memfd was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizes the memfd owned here.
    assert_eq!(
        unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), 64 * 512) },
        0
    );
    Disk::from_fd(fd, false, false).expect("disk")
}

fuzz_target!(|bytes: &[u8]| {
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = BackendConfig {
        queues: 2,
        threads: 1,
        queue_size: 256,
        poll: Duration::ZERO,
        serial: b"fuzz".to_vec(),
        io_uring: false,
        seccomp: tessera_seccomp::Filters::disabled(),
        stats: backend_stats::Stats::private(),
    };
    let backend = Arc::new(BlockBackend::new(memfd_disk(), config, mem.clone()).expect("backend"));
    let mut daemon =
        VhostUserDaemon::new("fuzz".into(), Served(backend.clone()), mem).expect("daemon");
    let mut guard = listener().lock().unwrap_or_else(|p| p.into_inner());
    let (listener, path) = &mut *guard;
    let frontend = UnixStream::connect(&*path).expect("connect");
    send_vhost_user_stream(&frontend, bytes);
    daemon.start(listener).expect("accept");
    let _ = daemon.wait();
    backend.stop_workers();
});
