//! `vhost-user-vsock`: a virtio-vsock device whose host side is
//! Firecracker's hybrid vsock: host processes connect to the Unix socket
//! at `--uds-path` and write `CONNECT <port>\n` to reach a guest port;
//! guest connections to the host (CID 2) port P go to `<uds-path>_P`.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use backend_stats::{Stats, VsockCounter};
use clap::Parser;
use tessera_types::{GuestCid, InheritedFd};
use vhost_user_common::cli::CommonArgs;
use vhost_user_common::process::{Failure, Process};
use vhost_user_common::BackendMemory;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use vhost_user_vsock::backend::{VsockBackend, VsockConfig, MUXER_EVENT};
use vhost_user_vsock::muxer::{Muxer, MuxerConfig};

/// A vhost-user vsock backend with Firecracker's hybrid host side.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-vsock", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The guest's context id (3 or more).
    #[arg(long, value_name = "CID")]
    guest_cid: GuestCid,
    /// The host's Unix socket: listened on for host-initiated connections
    /// (unless --uds-fd hands over a socket already listening there), and
    /// the prefix of `<PATH>_<port>` for guest-initiated ones.
    #[arg(long, value_name = "PATH")]
    uds_path: PathBuf,
    /// An inherited socket already listening at --uds-path.
    #[arg(long, value_name = "N")]
    uds_fd: Option<InheritedFd>,
    /// Connections at once (host clients still sending CONNECT count).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
}

/// The filters compiled from resources/seccomp/vhost-user-vsock.json.
const SECCOMP_FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

fn log_stats(stats: &Stats<VsockCounter>) {
    log::info!(
        "connections: {} from the host, {} from the guest; {} bytes to the guest, {} from it; \
         {} resets, {} credit stalls, {} packets dropped, {} host clients refused",
        stats.get(VsockCounter::HostConnsAdded),
        stats.get(VsockCounter::GuestConnsAdded),
        stats.get(VsockCounter::RxBytesCount),
        stats.get(VsockCounter::TxBytesCount),
        stats.get(VsockCounter::ConnsKilled),
        stats.get(VsockCounter::CreditStalls),
        stats.get(VsockCounter::DroppedPackets),
        stats.get(VsockCounter::RefusedHostClients),
    );
}

/// The host's listening socket: inherited, or bound at `--uds-path`.
fn uds_listener(cli: &Cli) -> Result<UnixListener, Failure> {
    match &cli.uds_fd {
        Some(fd) => fd
            .take()
            .map(UnixListener::from)
            .map_err(|err| Failure::setup(format_args!("--uds-fd {fd}: {err}"))),
        None => UnixListener::bind(&cli.uds_path).map_err(|err| {
            Failure::setup(format_args!(
                "cannot listen on {}: {err}",
                cli.uds_path.display()
            ))
        }),
    }
}

fn run(process: Process, cli: &Cli) -> Result<(), Failure> {
    let host_listener = uds_listener(cli)?;
    let seccomp = process.seccomp(&cli.common, SECCOMP_FILTERS)?;
    let mut listener = process.listener(&cli.common)?;
    let muxer_config = MuxerConfig {
        guest_cid: cli.guest_cid.get(),
        uds_path: cli.uds_path.clone(),
        max_connections: cli.max_connections as usize,
        stats: process.stats(&cli.common)?,
    };
    let muxer = Muxer::new(muxer_config, host_listener)
        .map_err(|err| Failure::runtime(format_args!("cannot serve the host side: {err}")))?;
    let stats = muxer.stats().clone();
    let epoll_fd = muxer.epoll_fd();
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = VsockConfig {
        queue_size: usize::from(cli.common.queue_size.get()),
        seccomp: seccomp.clone(),
    };
    let backend = VsockBackend::new(muxer, config, mem.clone())
        .map(Arc::new)
        .map_err(|err| Failure::runtime(format_args!("cannot create the device: {err}")))?;
    let on_signal = {
        let stats = stats.clone();
        move || log_stats(&stats)
    };
    process.confine(&seccomp, on_signal)?;
    let mut daemon = process.daemon(backend.clone(), mem)?;
    let handler = daemon
        .get_epoll_handlers()
        .into_iter()
        .next()
        .ok_or_else(|| Failure::runtime("the daemon has no worker"))?;
    handler
        .register_listener(epoll_fd, EventSet::IN, u64::from(MUXER_EVENT))
        .map_err(|err| Failure::runtime(format_args!("cannot watch the host side: {err}")))?;
    process.announce(format_args!(
        "guest CID {}, host side at {}",
        cli.guest_cid,
        cli.uds_path.display()
    ));
    let started = daemon.start(&mut listener);
    process.serve(&mut daemon, started, || {
        backend.stop_workers();
        log_stats(&stats);
        Ok(())
    })
}

fn main() -> ExitCode {
    vhost_user_common::process::main("vhost-user-vsock", run)
}
