//! `vhost-user-net`: moves frames between a guest's virtqueues and an
//! existing host TAP device over the vhost-user protocol, with the
//! virtio-net header passed to the TAP (IFF_VNET_HDR) so that checksum and
//! segmentation offloads cross without copies or software fallbacks.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use backend_stats::{NetCounter, Stats};
use clap::Parser;
use tessera_types::InheritedFd;
use vhost::vhost_user::Listener;
use vhost_user_common::cli::CommonArgs;
use vhost_user_common::process::{Failure, Process};
use vhost_user_common::BackendMemory;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use vhost_user_net::backend::{NetBackend, NetConfig};
use vhost_user_net::tap::Tap;
use vhost_user_net::{frame, relay};

/// A vhost-user network backend for one TAP device.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-net", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The existing TAP device to attach to.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "tap_fd",
        conflicts_with = "tap_fd"
    )]
    tap: Option<String>,
    /// An inherited TAP queue, opened with IFF_VNET_HDR; one per queue pair.
    #[arg(long, value_name = "N")]
    tap_fd: Vec<InheritedFd>,
    /// Number of queues: RX and TX queue pairs times two. Above 2 the TAP
    /// must be multi-queue.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=32))]
    queues: u16,
    /// The guest's MAC address (VIRTIO_NET_F_MAC); without it the guest
    /// picks a random one.
    #[arg(long, value_name = "MAC")]
    mac: Option<tessera_types::MacAddr>,
    /// The MTU offered to the guest (VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(68..))]
    mtu: Option<u16>,
    /// Accept VHOST_USER_SET_VRING_ENABLE before SET_FEATURES, as QEMU's
    /// vhost-user netdev sends it: such a request is acked and held until
    /// SET_FEATURES (without this option the connection ends there). Serves
    /// one frontend, through a relay thread. Tessera's VMM does not need it.
    #[arg(long)]
    defer_early_vring_enable: bool,
}

/// The filters compiled from resources/seccomp/vhost-user-net.json.
const SECCOMP_FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

fn log_stats(stats: &Stats<NetCounter>) {
    let dropped = |counters: &[NetCounter]| counters.iter().map(|&c| stats.get(c)).sum::<u64>();
    log::info!(
        "tx {} frames ({} dropped), rx {} frames ({} dropped), {} broken queue(s)",
        stats.get(NetCounter::TxPacketsCount),
        dropped(&[NetCounter::TxMalformedFrames, NetCounter::TapWriteFails]),
        stats.get(NetCounter::RxPacketsCount),
        dropped(&[NetCounter::RxFails, NetCounter::TapReadFails]),
        stats.get(NetCounter::EventFails)
    );
}

/// A private connection for the daemon to accept: a listener on a path
/// only this user can reach, already connected to and unlinked.
fn private_connection(dir: &Path) -> std::io::Result<(Listener, UnixStream)> {
    let path = dir.join(format!(".vhost-user-net-{}.relay", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let listener = UnixListener::bind(&path);
    nix::sys::stat::umask(umask);
    let client = match &listener {
        Ok(_) => UnixStream::connect(&path),
        Err(_) => Err(std::io::ErrorKind::NotConnected.into()),
    };
    let _ = std::fs::remove_file(&path);
    let (listener, client) = (listener?, client?);
    // SAFETY: the fd is a listening socket this function owns.
    Ok((
        unsafe { Listener::from_raw_fd(listener.into_raw_fd()) },
        client,
    ))
}

/// The TAP queues of `--tap` or `--tap-fd`, one per queue pair.
fn open_taps(cli: &Cli, pairs: usize) -> Result<Vec<Tap>, Failure> {
    let taps = match &cli.tap {
        Some(name) => Tap::open_queues(name, pairs, frame::VNET_HDR_LEN as i32),
        None if cli.tap_fd.len() != pairs => {
            return Err(Failure::setup(format_args!(
                "--queues {} needs {pairs} --tap-fd, got {}",
                cli.queues,
                cli.tap_fd.len()
            )))
        }
        None => {
            let fds = cli
                .tap_fd
                .iter()
                .map(|fd| {
                    fd.take()
                        .map_err(|err| Failure::setup(format_args!("--tap-fd {fd}: {err}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Tap::from_fds(fds, frame::VNET_HDR_LEN as i32)
        }
    };
    taps.map_err(Failure::setup)
}

/// With `--defer-early-vring-enable`: the relay's private connection,
/// made next to the socket (it needs socket calls the filters forbid).
fn relay_connection(cli: &Cli) -> Result<Option<(Listener, UnixStream)>, Failure> {
    if !cli.defer_early_vring_enable {
        return Ok(None);
    }
    let dir = match cli.common.socket.as_deref().and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        Some(_) => PathBuf::from("."),
        None => std::env::temp_dir(),
    };
    private_connection(&dir).map(Some).map_err(|err| {
        Failure::runtime(format_args!(
            "cannot set up the relay in {}: {err}",
            dir.display()
        ))
    })
}

fn run(process: Process, cli: &Cli) -> Result<(), Failure> {
    if !cli.queues.is_multiple_of(2) {
        return Err(Failure::setup(format_args!(
            "--queues must be even, got {}",
            cli.queues
        )));
    }
    let pairs = usize::from(cli.queues / 2);
    let taps = open_taps(cli, pairs)?;
    let seccomp = process.seccomp(&cli.common, SECCOMP_FILTERS)?;
    let mut listener = process.listener(&cli.common)?;
    let relay = relay_connection(cli)?;
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = NetConfig {
        mac: cli.mac.map(|mac| mac.bytes()),
        mtu: cli.mtu,
        queue_pairs: pairs,
        queue_size: usize::from(cli.common.queue_size.get()),
        seccomp: seccomp.clone(),
        stats: process.stats(&cli.common)?,
    };
    let backend = NetBackend::new(taps, config, mem.clone())
        .map(Arc::new)
        .map_err(|err| Failure::runtime(format_args!("cannot create the device: {err}")))?;
    let on_signal = {
        let backend = backend.clone();
        move || log_stats(backend.stats())
    };
    process.confine(&seccomp, on_signal)?;
    let mut daemon = process.daemon(backend.clone(), mem)?;
    for (pair, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        backend
            .watch_tap(pair, handler.as_raw_fd())
            .map_err(|err| Failure::runtime(format_args!("cannot watch the TAP: {err}")))?;
        // The limiters are the interface's: every pair waits on their
        // timers (edge-triggered, each woken once per expiration).
        for (fd, event) in backend.limiter_fds() {
            handler
                .register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, event)
                .map_err(|err| {
                    Failure::runtime(format_args!("cannot watch a rate limiter: {err}"))
                })?;
        }
    }
    process.announce(format_args!(
        "serving TAP {} with {pairs} queue pair(s){}",
        cli.tap.as_deref().unwrap_or("from --tap-fd"),
        if relay.is_some() {
            ", deferring SET_VRING_ENABLE before SET_FEATURES"
        } else {
            ""
        }
    ));
    let started = match relay {
        None => daemon.start(&mut listener),
        Some((mut inner, handler_end)) => {
            let frontend = loop {
                match listener.accept() {
                    Ok(Some(stream)) => break stream,
                    Ok(None) => continue,
                    Err(err) => {
                        return Err(Failure::runtime(format_args!(
                            "cannot accept a frontend: {err}"
                        )))
                    }
                }
            };
            relay::spawn(frontend, handler_end, u32::from(cli.queues))
                .map_err(|err| Failure::runtime(format_args!("cannot start the relay: {err}")))?;
            daemon.start(&mut inner)
        }
    };
    process.serve(&mut daemon, started, || {
        backend.stop_workers();
        log_stats(backend.stats());
        Ok(())
    })
}

fn main() -> ExitCode {
    vhost_user_common::process::main("vhost-user-net", run)
}
