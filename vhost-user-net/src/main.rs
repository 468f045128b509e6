//! `vhost-user-net`: moves frames between a guest's virtqueues and an
//! existing host TAP device over the vhost-user protocol, with the
//! virtio-net header passed to the TAP (IFF_VNET_HDR) so that checksum and
//! segmentation offloads cross without copies or software fallbacks.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use vhost_user_net::backend::{NetBackend, NetConfig};
use vhost_user_net::tap::Tap;
use vhost_user_net::{backend, frame, relay};

/// A vhost-user network backend for one TAP device.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-net", version, about)]
struct Cli {
    /// Listen on this Unix socket.
    #[arg(long, value_name = "PATH", required_unless_present = "fd")]
    socket: Option<PathBuf>,
    /// Serve an inherited, already listening socket.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    fd: Option<i32>,
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
    tap_fd: Vec<i32>,
    /// Run without seccomp filters (for debugging only).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Load the seccomp filters (kinds "main" and "worker") from this
    /// seccompiler JSON file instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Number of queues: RX and TX queue pairs times two. Above 2 the TAP
    /// must be multi-queue.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=32))]
    queues: u16,
    /// The largest queue the frontend may set up (a power of two).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
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

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("vhost-user-net: {message}");
    ExitCode::from(code)
}

fn log_stats(stats: &backend::NetStats) {
    eprintln!(
        "vhost-user-net: tx {} frames ({} dropped), rx {} frames ({} dropped), {} broken queue(s)",
        stats.tx_frames.load(Ordering::Relaxed),
        stats.tx_dropped.load(Ordering::Relaxed),
        stats.rx_frames.load(Ordering::Relaxed),
        stats.rx_dropped.load(Ordering::Relaxed),
        stats.broken_queues.load(Ordering::Relaxed)
    );
}

/// Ends the process cleanly on SIGTERM or SIGINT: the counters are logged
/// and the exit status is 0. Call it before any other thread starts, so
/// that every thread inherits the blocked mask and only the waiter gets the
/// signals.
fn exit_on_termination(backend: Arc<NetBackend>) -> nix::Result<()> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let name = signals.wait().map_or("a signal", Signal::as_str);
            log_stats(&backend.stats);
            eprintln!("vhost-user-net: {name}: exiting");
            std::process::exit(0);
        })
        .map_err(|_| nix::Error::EAGAIN)?;
    Ok(())
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // virtio-queue logs an error for each bad chain a guest posts, with no
    // limit: it is off unless RUST_LOG names it; the backend reports a
    // broken ring itself, rate-limited.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("virtio_queue", log::LevelFilter::Off)
        .parse_env(env_logger::Env::default())
        .init();
    if !cli.queue_size.is_power_of_two() || cli.queues % 2 != 0 {
        return fail(
            2,
            format_args!(
                "--queues must be even and --queue-size a power of two, got {} and {}",
                cli.queues, cli.queue_size
            ),
        );
    }
    let mac = cli.mac.map(|mac| mac.bytes());
    let pairs = usize::from(cli.queues / 2);
    let taps = match &cli.tap {
        Some(name) => Tap::open_queues(name, pairs, frame::VNET_HDR_LEN as i32),
        None if cli.tap_fd.len() != pairs => {
            return fail(
                2,
                format_args!(
                    "--queues {} needs {pairs} --tap-fd, got {}",
                    cli.queues,
                    cli.tap_fd.len()
                ),
            )
        }
        None => match cli
            .tap_fd
            .iter()
            .map(|&fd| {
                tessera_seccomp::take_inherited_fd(fd)
                    .map_err(|err| format!("--tap-fd {fd}: {err}"))
            })
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(fds) => Tap::from_fds(fds, frame::VNET_HDR_LEN as i32),
            Err(err) => return fail(2, err),
        },
    };
    let taps = match taps {
        Ok(taps) => taps,
        Err(err) => return fail(2, err),
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
        // SAFETY: the fd was inherited for this purpose; nothing else in
        // this process owns it.
        (None, Some(fd)) => unsafe { Listener::from_raw_fd(fd) },
        (None, None) => return fail(2, "give --socket PATH or --fd N"),
    };
    // The relay's private connection needs socket calls the filters forbid.
    let relay = if cli.defer_early_vring_enable {
        let dir = match cli.socket.as_deref().and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            Some(_) => PathBuf::from("."),
            None => std::env::temp_dir(),
        };
        match private_connection(&dir) {
            Ok(pair) => Some(pair),
            Err(err) => {
                return fail(
                    1,
                    format_args!("cannot set up the relay in {}: {err}", dir.display()),
                )
            }
        }
    } else {
        None
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let config = NetConfig {
        mac,
        mtu: cli.mtu,
        queue_pairs: pairs,
        queue_size: usize::from(cli.queue_size),
        seccomp: seccomp.clone(),
    };
    let backend = match NetBackend::new(taps, config, mem.clone()) {
        Ok(backend) => Arc::new(backend),
        Err(err) => return fail(1, format_args!("cannot create the device: {err}")),
    };
    // Everything that needs more than the filters allow is done: from here
    // on, this thread and every thread it starts are confined.
    if let Err(err) = seccomp.apply("main") {
        return fail(1, err);
    }
    if let Err(err) = exit_on_termination(backend.clone()) {
        return fail(1, format_args!("cannot set up SIGTERM handling: {err}"));
    }
    let mut daemon = match VhostUserDaemon::new("vhost-user-net".into(), backend.clone(), mem) {
        Ok(daemon) => daemon,
        Err(err) => return fail(1, format_args!("cannot create the daemon: {err}")),
    };
    for (pair, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let Some(tap) = backend.taps().get(pair) else {
            break;
        };
        if let Err(err) = handler.register_listener(
            tap.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            backend.tap_event(pair),
        ) {
            return fail(1, format_args!("cannot watch the TAP: {err}"));
        }
    }
    eprintln!(
        "vhost-user-net: serving TAP {} with {pairs} queue pair(s){}",
        cli.tap.as_deref().unwrap_or("from --tap-fd"),
        if relay.is_some() {
            ", deferring SET_VRING_ENABLE before SET_FEATURES"
        } else {
            ""
        }
    );
    let started = match relay {
        None => daemon.start(&mut listener),
        Some((mut inner, handler_end)) => {
            let frontend = loop {
                match listener.accept() {
                    Ok(Some(stream)) => break stream,
                    Ok(None) => continue,
                    Err(err) => return fail(1, format_args!("cannot accept a frontend: {err}")),
                }
            };
            if let Err(err) = relay::spawn(frontend, handler_end, u32::from(cli.queues)) {
                return fail(1, format_args!("cannot start the relay: {err}"));
            }
            daemon.start(&mut inner)
        }
    };
    if let Err(err) = started {
        return fail(1, format_args!("cannot accept a frontend: {err}"));
    }
    let result = daemon.wait();
    backend.stop_workers();
    log_stats(&backend.stats);
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
            eprintln!("vhost-user-net: the frontend disconnected; exiting");
            ExitCode::SUCCESS
        }
        Err(err) => fail(1, format_args!("the vhost-user connection failed: {err}")),
    }
}
