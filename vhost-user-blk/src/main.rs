//! `vhost-user-blk`: serves one drive (a raw image or block device) to a VMM
//! over the vhost-user protocol. The VMM shares guest memory and hands over
//! each queue's kick and call eventfds; this process then moves the data
//! between the guest's buffers and the file without the VMM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use backend_stats::{BlockCounter, Stats};
use clap::Parser;
use tessera_types::InheritedFd;
use vhost_user_common::cli::CommonArgs;
use vhost_user_common::process::{Failure, Process, EXIT_BROKEN};
use vhost_user_common::BackendMemory;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use vhost_user_blk::backend::{BackendConfig, BlockBackend};
use vhost_user_blk::disk::Disk;
use vhost_user_blk::request;

/// A vhost-user block backend for one raw image or block device.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
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
    disk_fd: Option<InheritedFd>,
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

fn log_stats(stats: &Stats<BlockCounter>) {
    let invalid = stats.get(BlockCounter::InvalidReqsCount);
    let io_errors = stats.get(BlockCounter::ExecuteFails);
    log::info!(
        "{} request(s) failed ({invalid} invalid, {io_errors} I/O errors), {} read(s), \
         {} write(s), {} queue(s) broken",
        invalid + io_errors,
        stats.get(BlockCounter::ReadCount),
        stats.get(BlockCounter::WriteCount),
        stats.get(BlockCounter::EventFails)
    );
}

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
            log_stats(backend.stats());
            log::error!("the device is broken; {flushed}; closing the connection");
            std::process::exit(EXIT_BROKEN);
        })?;
    Ok(())
}

/// The worker threads: `--threads`, or one per queue but no more than the
/// CPUs this process may use.
fn worker_threads(cli: &Cli) -> Result<usize, Failure> {
    let queues = usize::from(cli.queues);
    match cli.threads.map(usize::from) {
        Some(threads) if threads > queues => Err(Failure::setup(format_args!(
            "--threads {threads} exceeds --queues {queues}: a worker serves whole queues"
        ))),
        Some(threads) => Ok(threads),
        None => Ok(std::thread::available_parallelism().map_or(1, |cpus| cpus.get().min(queues))),
    }
}

/// The disk of `--path` or `--disk-fd`, and how to name it.
fn open_disk(cli: &Cli) -> Result<(Disk, String), Failure> {
    match (&cli.path, cli.disk_fd) {
        (Some(path), _) => Disk::open(path, cli.readonly, cli.direct)
            .map(|disk| (disk, path.display().to_string()))
            .map_err(Failure::setup),
        (None, Some(fd)) => {
            let owned = fd
                .take()
                .map_err(|err| Failure::setup(format_args!("--disk-fd {fd}: {err}")))?;
            Disk::from_fd(owned, cli.readonly, cli.direct)
                .map(|disk| (disk, format!("--disk-fd {fd}")))
                .map_err(Failure::setup)
        }
        (None, None) => Err(Failure::setup("give --path FILE or --disk-fd N")),
    }
}

fn run(process: Process, cli: &Cli) -> Result<(), Failure> {
    let threads = worker_threads(cli)?;
    let serial = cli.serial.clone().unwrap_or_default().into_bytes();
    if serial.len() > request::ID_LEN {
        return Err(Failure::setup(format_args!(
            "--serial holds at most {} bytes",
            request::ID_LEN
        )));
    }
    let (disk, source) = open_disk(cli)?;
    let sectors = disk.sectors();
    let mut listener = process.listener(&cli.common)?;
    let seccomp = process.seccomp(&cli.common, SECCOMP_FILTERS)?;
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = BackendConfig {
        queues: usize::from(cli.queues),
        threads,
        queue_size: usize::from(cli.common.queue_size.get()),
        poll: Duration::from_micros(cli.poll_us),
        serial,
        io_uring: cli.io_engine == "io_uring",
        seccomp: seccomp.clone(),
        stats: process.stats(&cli.common)?,
    };
    let backend = BlockBackend::new(disk, config, mem.clone())
        .map(Arc::new)
        .map_err(|err| Failure::runtime(format_args!("cannot create the device: {err}")))?;
    let on_signal = {
        let backend = backend.clone();
        move || {
            log_stats(backend.stats());
            if let Err(err) = backend.flush() {
                log::error!("flush failed: {err}");
            }
        }
    };
    process.confine(&seccomp, on_signal)?;
    if let Err(err) = backend.prefault_image() {
        log::warn!("cannot prefault the image's mapping: {err}");
    }
    end_when_broken(backend.clone())
        .map_err(|err| Failure::runtime(format_args!("cannot watch for a broken device: {err}")))?;
    let mut daemon = process.daemon(backend.clone(), mem)?;
    // Every worker waits on the rate limiter's timer (edge-triggered: each
    // is woken once per expiration, and the one that reads it unblocks).
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(
                backend.limiter_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.limiter_event(),
            )
            .map_err(|err| {
                Failure::runtime(format_args!("cannot watch the rate limiter: {err}"))
            })?;
    }
    process.announce(format_args!(
        "serving {source} ({sectors} sectors{}) with {} queue(s) on {threads} worker thread(s)",
        if cli.readonly { ", read-only" } else { "" },
        cli.queues
    ));
    let started = daemon.start(&mut listener);
    process.serve(&mut daemon, started, || {
        backend.stop_workers();
        log_stats(backend.stats());
        backend
            .flush()
            .map_err(|err| Failure::runtime(format_args!("final flush failed: {err}")))
    })
}

fn main() -> ExitCode {
    vhost_user_common::process::main("vhost-user-blk", run)
}
