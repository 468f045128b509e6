//! The vhost-user message stream into vhost-user-net: bytes from a hostile
//! frontend, with the fds each request carries (`tessera_fuzz::vhost_user_messages`), read by the
//! backend's real request handler (the vhost crate's, with the patched
//! vhost-user-backend) and the net backend behind it, on a TAP. Needs root and /dev/net/tun.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::send_vhost_user_stream;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vhost_user_common::device::Served;
use vhost_user_common::BackendMemory;
use vhost_user_net::backend::{NetBackend, NetConfig};
use vhost_user_net::frame::VNET_HDR_LEN;
use vhost_user_net::tap::Tap;
use vm_memory::GuestMemoryAtomic;

struct Fixture {
    listener: Listener,
    path: std::path::PathBuf,
    /// One TAP for the whole run; each input gets a duplicate of its fd.
    tap: Tap,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("tessera-fuzz-net-{}.sock", std::process::id()));
        let listener = Listener::new(&path, true).expect("listen");
        let name = format!("tfz{}", std::process::id() % 100_000);
        let tap = Tap::open_queues(&name, 1, VNET_HDR_LEN as i32)
            .expect("open a TAP (the net fuzz target needs root and /dev/net/tun)")
            .remove(0);
        Mutex::new(Fixture {
            listener,
            path,
            tap,
        })
    })
}

fuzz_target!(|bytes: &[u8]| {
    let mut fixture = fixture().lock().unwrap_or_else(|p| p.into_inner());
    let Ok(tap) = nix::unistd::dup(fixture.tap.as_raw_fd()) else {
        return;
    };
    // SAFETY: `dup` just made this fd, and it is owned here.
    let tap = unsafe { OwnedFd::from_raw_fd(tap) };
    let taps = Tap::from_fds(vec![tap], VNET_HDR_LEN as i32).expect("TAP fd");
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = NetConfig {
        mac: Some([0x06, 0, 0xac, 0x10, 0, 2]),
        mtu: None,
        queue_pairs: 1,
        queue_size: 256,
        seccomp: tessera_seccomp::Filters::disabled(),
        stats: backend_stats::Stats::private(),
    };
    let backend = Arc::new(NetBackend::new(taps, config, mem.clone()).expect("backend"));
    let mut daemon =
        VhostUserDaemon::new("fuzz".into(), Served(backend.clone()), mem).expect("daemon");
    let frontend = UnixStream::connect(&fixture.path).expect("connect");
    send_vhost_user_stream(&frontend, bytes);
    daemon.start(&mut fixture.listener).expect("accept");
    let _ = daemon.wait();
    backend.stop_workers();
});
