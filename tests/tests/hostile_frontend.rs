//! The backends against a hostile guest, played by a vhost-user frontend
//! that writes the rings itself (the `vhost` crate's `Frontend`, no VMM):
//! broken ring indices and floods of bad requests must not make a backend
//! spin, flood its log, or fail without the VMM seeing it (its vhost-user
//! connection closing).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tessera_tests::netns::Netns;
use tessera_tests::{workspace_bin, Running};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_common::process::EXIT_BROKEN;
use virtio_bindings::{virtio_config, virtio_ring};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 1 << 20;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const BUFFERS: u64 = 0x1_0000;

/// A backend process serving a 1 MiB image on a socket.
struct Backend {
    dir: tempfile::TempDir,
    socket: PathBuf,
    process: Running,
}

impl Backend {
    fn start_blk(envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; MEM_SIZE]).unwrap();
        let socket = dir.path().join("blk.sock");
        let mut command = Command::new(workspace_bin("vhost-user-blk"));
        command
            .arg("--socket")
            .arg(&socket)
            .arg("--path")
            .arg(&image)
            .args(["--queue-size", "16"])
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied());
        let process = Running::spawn(command);
        assert!(
            tessera_tests::wait_for_listener(&socket, Duration::from_secs(10)),
            "{} never appeared",
            socket.display()
        );
        Self {
            dir,
            socket,
            process,
        }
    }

    /// A `vhost-user-net` on `tap0` of `netns`, one queue pair.
    fn start_net(netns: &Netns) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let mut command = netns.command(workspace_bin("vhost-user-net").to_str().unwrap());
        command
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", "tap0", "--queue-size", "16"])
            .env_remove("RUST_LOG");
        let process = Running::spawn(command);
        assert!(
            tessera_tests::wait_for_path(&socket, Duration::from_secs(10)),
            "{}",
            process.stderr()
        );
        Self {
            dir,
            socket,
            process,
        }
    }

    /// CPU seconds the process used so far (user + system).
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.process.pid()).unwrap_or(f64::NAN)
    }

    /// Waits up to `timeout` for the process to exit; its CPU seconds are
    /// sampled until then (a process that exited has no /proc entry).
    fn wait_for_exit(&mut self, timeout: Duration) -> (bool, f64) {
        let pid = self.process.pid();
        let deadline = self.process.elapsed() + timeout;
        let cpu = std::cell::Cell::new(0.0f64);
        let exited = self.process.wait_until(deadline, |_, _| {
            if let Some(seconds) = cpu_seconds(pid) {
                cpu.set(seconds);
            }
            false
        });
        (exited, cpu.get())
    }
}

/// The end of a log that may be huge.
fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(2048);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces: utime and stime are
    // fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// The driver side of one queue, in guest memory the backend maps.
struct Guest {
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    _call: EventFd,
    next_avail: u16,
}

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(c"hostile-guest".as_ptr(), libc::MFD_CLOEXEC) };
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

impl Guest {
    /// Sets up queue `queue` (of the device's `queues`), of `QUEUE_SIZE`
    /// entries with EVENT_IDX; the others stay unset.
    fn connect(socket: &Path, queues: u64, queue: usize) -> Self {
        let mut frontend = Frontend::connect(socket, queues).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let wanted = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX;
        assert_eq!(offered & wanted, wanted);
        let protocol = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(protocol & VhostUserProtocolFeatures::MQ)
            .unwrap();
        frontend.set_features(wanted).unwrap();
        let mem = guest_memory();
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        frontend.set_mem_table(&regions).unwrap();
        let host = |addr: u64| mem.get_host_address(GuestAddress(addr)).unwrap() as u64;
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: host(DESC_TABLE),
            used_ring_addr: host(USED_RING),
            avail_ring_addr: host(AVAIL_RING),
            log_addr: None,
        };
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        frontend.set_vring_num(queue, QUEUE_SIZE).unwrap();
        frontend.set_vring_addr(queue, &config).unwrap();
        frontend.set_vring_base(queue, 0).unwrap();
        frontend.set_vring_call(queue, &call).unwrap();
        frontend.set_vring_kick(queue, &kick).unwrap();
        frontend.set_vring_enable(queue, true).unwrap();
        Self {
            _frontend: frontend,
            mem,
            kick,
            _call: call,
            next_avail: 0,
        }
    }

    fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_TABLE + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Puts `head` in the next avail entry (published by `publish`).
    fn post(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes `idx` as the avail index, whatever it is, and kicks.
    fn publish(&self, idx: u16) {
        self.mem
            .store(idx.to_le(), GuestAddress(AVAIL_RING + 2), Ordering::Release)
            .unwrap();
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(USED_RING + 2), Ordering::Acquire)
                .unwrap(),
        )
    }
}

/// A broken ring must end the backend at once (the VMM sees its connection
/// close and fails the disk's requests), without spinning or flooding.
fn assert_ends_quietly(mut backend: Backend, what: &str) {
    let (exited, cpu) = backend.wait_for_exit(Duration::from_secs(3));
    let output = backend.process.finish();
    assert!(
        exited,
        "{what}: the backend did not end ({cpu} CPU seconds, {} bytes of log)\n{}",
        output.stderr.len(),
        tail(&output.stderr)
    );
    eprintln!(
        "{what}: ended after {:?}, {cpu} CPU seconds, {} bytes of log",
        output.elapsed,
        output.stderr.len()
    );
    assert_eq!(output.code(), EXIT_BROKEN, "{what}\n{}", output.describe());
    assert!(
        cpu < 0.5,
        "{what}: {cpu} CPU seconds\n{}",
        output.describe()
    );
    assert!(
        output.stderr.len() < 4096,
        "{what}: {} bytes of log\n{}",
        output.stderr.len(),
        output.describe()
    );
    assert!(
        output.stderr.contains("is broken"),
        "{what}\n{}",
        output.describe()
    );
    drop(backend.dir);
}

#[test]
fn blk_an_avail_index_past_the_ring_ends_the_backend_without_spinning() {
    let backend = Backend::start_blk(&[]);
    let guest = Guest::connect(&backend.socket, 1, 0);
    guest.publish(QUEUE_SIZE + 1);
    assert_ends_quietly(backend, "avail.idx = size + 1");
    drop(guest);
}

#[test]
fn blk_a_head_past_the_queue_ends_the_backend() {
    let backend = Backend::start_blk(&[]);
    let mut guest = Guest::connect(&backend.socket, 1, 0);
    guest.post(QUEUE_SIZE);
    guest.publish(guest.next_avail);
    assert_ends_quietly(backend, "head = size");
    drop(guest);
}

#[test]
fn blk_a_flood_of_bad_requests_is_answered_not_logged() {
    // Debug level: each refused request would be a line without the limit.
    let mut backend = Backend::start_blk(&[("RUST_LOG", "debug")]);
    let mut guest = Guest::connect(&backend.socket, 1, 0);
    // Eight chains of a device-writable header (refused) and a status byte.
    for chain in 0..QUEUE_SIZE / 2 {
        let (header, status) = (2 * chain, 2 * chain + 1);
        let buffer = BUFFERS + 0x100 * u64::from(chain);
        guest.set_desc(
            header,
            buffer,
            16,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            status,
        );
        guest.set_desc(status, buffer + 0x80, 1, VRING_DESC_F_WRITE, 0);
    }
    let cpu_before = backend.cpu_seconds();
    let rounds = 250;
    for _ in 0..rounds {
        for chain in 0..QUEUE_SIZE / 2 {
            guest.post(2 * chain);
        }
        guest.publish(guest.next_avail);
        let deadline = Instant::now() + Duration::from_secs(5);
        while guest.used_idx() != guest.next_avail {
            assert!(Instant::now() < deadline, "the backend stopped answering");
            std::thread::yield_now();
        }
    }
    let status: u8 = guest.mem.read_obj(GuestAddress(BUFFERS + 0x80)).unwrap();
    assert_eq!(status, 1, "VIRTIO_BLK_S_IOERR");
    let cpu = backend.cpu_seconds() - cpu_before;
    eprintln!("{} refused requests: {cpu} CPU seconds", rounds * 8);
    // The frontend hangs up: the backend ends normally.
    drop(guest);
    let (exited, _) = backend.wait_for_exit(Duration::from_secs(5));
    let output = backend.process.finish();
    assert!(
        exited,
        "the backend outlived its frontend\n{}",
        output.describe()
    );
    assert_eq!(output.code(), 0, "{}", output.describe());
    let refused = output.stderr.matches("failed:").count();
    assert!(
        refused <= 20,
        "{refused} log lines for {} refused requests\n{}",
        rounds * 8,
        output.describe()
    );
    // Counted instead.
    assert!(
        tessera_tests::has_line(
            &output.stderr,
            &format!("vhost-user-blk: {} request(s) failed", rounds * 8)
        ),
        "{}",
        output.describe()
    );
    assert!(cpu < 2.0, "{cpu} CPU seconds for {} requests", rounds * 8);
}

#[test]
fn net_a_broken_tx_ring_is_left_alone_and_the_backend_ends_with_its_frontend() {
    let netns = Netns::with_tap("hostile", "10.77.9.1/24");
    let mut backend = Backend::start_net(&netns);
    // TX is queue 1.
    let guest = Guest::connect(&backend.socket, 2, 1);
    let cpu_before = backend.cpu_seconds();
    guest.publish(QUEUE_SIZE + 1);
    std::thread::sleep(Duration::from_millis(500));
    // Kicking a broken queue again costs nothing either.
    for _ in 0..100 {
        guest.kick.write(1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let cpu = backend.cpu_seconds() - cpu_before;
    eprintln!(
        "broken TX ring: {cpu} CPU seconds in 1 s, {} bytes of log",
        backend.process.stderr().len()
    );
    assert!(cpu < 0.2, "{cpu} CPU seconds in 1 s on a broken ring");
    assert!(
        backend.process.stderr().len() < 4096,
        "{} bytes of log\n{}",
        backend.process.stderr().len(),
        tail(&backend.process.stderr())
    );
    drop(guest);
    let (exited, _) = backend.wait_for_exit(Duration::from_secs(5));
    let output = backend.process.finish();
    assert!(
        exited,
        "the backend outlived its frontend\n{}",
        tail(&output.stderr)
    );
    assert_eq!(output.code(), 0, "{}", output.describe());
    assert!(
        output.stderr.contains("queue 1 is broken"),
        "{}",
        output.describe()
    );
    assert!(
        output.stderr.contains("1 broken queue(s)"),
        "{}",
        output.describe()
    );
    drop(backend.dir);
}
