//! `vhost-user-blk`: serves one drive (a raw image or block device) to a VMM
//! over the vhost-user protocol. The VMM shares guest memory and hands over
//! each queue's kick and call eventfds; this process then moves the data
//! between the guest's buffers and the file without the VMM.

use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use vhost_user_blk::backend::{BackendConfig, BlockBackend, BlockStats};
use vhost_user_blk::disk::Disk;
use vhost_user_blk::request;

/// A vhost-user block backend for one raw image or block device.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version, about)]
struct Cli {
    /// Listen on this Unix socket.
    #[arg(long, value_name = "PATH", required_unless_present = "fd")]
    socket: Option<PathBuf>,
    /// Serve an inherited, already listening socket.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    fd: Option<i32>,
    /// The backing raw image or block device.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "disk_fd",
        conflicts_with = "disk_fd"
    )]
    path: Option<PathBuf>,
    /// Serve this inherited, already open disk instead of --path.
    #[arg(long, value_name = "N")]
    disk_fd: Option<i32>,
    /// Run without seccomp filters (for debugging only).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Load the seccomp filters (kinds "main" and "worker") from this
    /// seccompiler JSON file instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Refuse guest writes.
    #[arg(long)]
    readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Number of request queues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Worker threads serving the queues, queue q on thread q % N. The
    /// default is one per queue, but no more than the CPUs this process may
    /// run on (its affinity mask and cgroup quota): threads sharing a CPU
    /// only take turns, where one thread can gather every queue's requests
    /// into one submission.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    /// The largest queue the frontend may set up (a power of two, at most
    /// 32768). QEMU asks for 1024 entries by default.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// The serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID")]
    serial: Option<String>,
    /// Microseconds a queue worker keeps polling after its last request
    /// before it sleeps on the kick eventfd (0 disables polling).
    #[arg(long, default_value_t = 50, value_name = "US")]
    poll_us: u64,
    /// The I/O engine: io_uring (falls back to sync where the kernel lacks
    /// it) or sync.
    #[arg(long, default_value = "io_uring", value_parser = ["io_uring", "sync"])]
    io_engine: String,
}

/// The filters compiled from resources/seccomp/vhost-user-blk.json.
const SECCOMP_FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("vhost-user-blk: {message}");
    ExitCode::from(code)
}

/// Ends the process cleanly on SIGTERM or SIGINT: the data is flushed and the
/// exit status is 0, with a log line saying why.
fn handle_termination(backend: Arc<BlockBackend>) -> std::io::Result<()> {
    // SAFETY: plain sigset manipulation on a local, zero-initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    };
    // SAFETY: blocks the two signals in this thread; threads created later
    // inherit the mask, so only the waiter below receives them.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is a valid signal set and `signal` a writable int.
            unsafe { libc::sigwait(&set, &mut signal) };
            let name = if signal == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            log_stats(&backend.stats);
            match backend.flush() {
                Ok(()) => eprintln!("vhost-user-blk: {name}: data flushed, exiting"),
                Err(err) => eprintln!("vhost-user-blk: {name}: flush failed: {err}, exiting"),
            }
            std::process::exit(0);
        })?;
    Ok(())
}

fn log_stats(stats: &BlockStats) {
    eprintln!(
        "vhost-user-blk: {} request(s) failed, {} queue(s) broken",
        stats.failed_requests.load(Ordering::Relaxed),
        stats.broken_queues.load(Ordering::Relaxed)
    );
}

/// The exit status once the device broke (the guest broke a queue, or a
/// worker's I/O engine failed).
const EXIT_BROKEN: i32 = 3;

/// Ends the process once the device is broken (the failing worker waited
/// for its I/O in flight; the kernel cancels the others' before it unmaps
/// anything): closing the vhost-user connection is what the VMM sees, and
/// it then fails the disk's requests itself.
fn end_when_broken(backend: Arc<BlockBackend>) -> std::io::Result<()> {
    let broken = backend.broken_event()?;
    std::thread::Builder::new()
        .name("broken".into())
        .spawn(move || {
            if broken.consume().is_err() {
                return;
            }
            backend.stop_workers();
            let flushed = match backend.flush() {
                Ok(()) => "data flushed".to_string(),
                Err(err) => format!("flush failed: {err}"),
            };
            log_stats(&backend.stats);
            eprintln!("vhost-user-blk: the device is broken; {flushed}; closing the connection");
            std::process::exit(EXIT_BROKEN);
        })?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings and errors by default; RUST_LOG=debug shows refused requests
    // (rate-limited) and every vhost-user message the library logs.
    // virtio-queue logs an error for each bad chain a guest posts, with no
    // limit: it is off unless RUST_LOG names it, the backend reports a
    // broken ring once itself.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("virtio_queue", log::LevelFilter::Off)
        .parse_env(env_logger::Env::default())
        .init();
    if !cli.queue_size.is_power_of_two() || cli.queue_size > 32768 {
        return fail(
            2,
            format_args!(
                "--queue-size must be a power of two up to 32768, got {}",
                cli.queue_size
            ),
        );
    }
    let queues = usize::from(cli.queues);
    let threads = match cli.threads.map(usize::from) {
        Some(threads) if threads > queues => {
            return fail(
                2,
                format_args!(
                    "--threads {threads} exceeds --queues {queues}: a worker serves whole queues"
                ),
            )
        }
        Some(threads) => threads,
        None => std::thread::available_parallelism().map_or(1, |cpus| cpus.get().min(queues)),
    };
    let serial = cli.serial.clone().unwrap_or_default().into_bytes();
    if serial.len() > request::ID_LEN {
        return fail(
            2,
            format_args!("--serial holds at most {} bytes", request::ID_LEN),
        );
    }
    let disk = match (&cli.path, cli.disk_fd) {
        (Some(path), _) => Disk::open(path, cli.readonly, cli.direct),
        (None, Some(fd)) => match tessera_seccomp::take_inherited_fd(fd) {
            Ok(fd) => Disk::from_fd(fd, cli.readonly, cli.direct),
            Err(err) => return fail(2, format_args!("--disk-fd {fd}: {err}")),
        },
        (None, None) => return fail(2, "give --path FILE or --disk-fd N"),
    };
    let disk = match disk {
        Ok(disk) => disk,
        Err(err) => return fail(2, err),
    };
    let source = match &cli.path {
        Some(path) => path.display().to_string(),
        None => format!("--disk-fd {}", cli.disk_fd.unwrap_or_default()),
    };
    let sectors = disk.sectors();
    let mut listener = match (&cli.socket, cli.fd) {
        (Some(path), _) => match Listener::new(path, true) {
            Ok(listener) => listener,
            Err(err) => {
                return fail(
                    2,
                    format_args!("cannot listen on {}: {err}", path.display()),
                )
            }
        },
        (None, Some(fd)) => {
            if !is_socket(fd) {
                return fail(2, format_args!("--fd {fd} is not an open socket"));
            }
            // SAFETY: the fd was inherited for this purpose and checked to
            // be a socket; nothing else in this process owns it.
            unsafe { Listener::from_raw_fd(fd) }
        }
        (None, None) => return fail(2, "give --socket PATH or --fd N"),
    };

    let seccomp = match tessera_seccomp::load(
        SECCOMP_FILTERS,
        cli.no_seccomp,
        cli.seccomp_filter.as_deref(),
        &["main", "worker"],
    ) {
        Ok(filters) => filters,
        Err(err) => return fail(2, err),
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let config = BackendConfig {
        queues,
        threads,
        queue_size: usize::from(cli.queue_size),
        poll: Duration::from_micros(cli.poll_us),
        serial,
        io_uring: cli.io_engine == "io_uring",
        seccomp: seccomp.clone(),
    };
    let backend = match BlockBackend::new(disk, config, mem.clone()) {
        Ok(backend) => Arc::new(backend),
        Err(err) => return fail(1, format_args!("cannot create the device: {err}")),
    };
    // Everything that needs more than the filters allow is done: from here
    // on, this thread and every thread it starts are confined.
    if let Err(err) = seccomp.apply("main") {
        return fail(1, err);
    }
    if let Err(err) = handle_termination(backend.clone()) {
        return fail(1, format_args!("cannot install signal handling: {err}"));
    }
    if let Err(err) = end_when_broken(backend.clone()) {
        return fail(1, format_args!("cannot watch for a broken device: {err}"));
    }
    let mut daemon = match VhostUserDaemon::new("vhost-user-blk".into(), backend.clone(), mem) {
        Ok(daemon) => daemon,
        Err(err) => return fail(1, format_args!("cannot create the daemon: {err}")),
    };
    eprintln!(
        "vhost-user-blk: serving {} ({sectors} sectors{}) with {} queue(s) on {threads} worker thread(s)",
        source,
        if cli.readonly { ", read-only" } else { "" },
        cli.queues
    );
    if let Err(err) = daemon.start(&mut listener) {
        return fail(1, format_args!("cannot accept a frontend: {err}"));
    }
    let result = daemon.wait();
    backend.stop_workers();
    log_stats(&backend.stats);
    if let Err(err) = backend.flush() {
        return fail(1, format_args!("final flush failed: {err}"));
    }
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
            eprintln!("vhost-user-blk: the frontend disconnected; exiting");
            ExitCode::SUCCESS
        }
        Err(err) => fail(1, format_args!("the vhost-user connection failed: {err}")),
    }
}

fn is_socket(fd: i32) -> bool {
    // SAFETY: fstat writes into a zeroed local stat buffer.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut stat) == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
    }
}
