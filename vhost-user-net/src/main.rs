//! `vhost-user-net`: moves packets between a guest's virtqueues and a host
//! TAP device over the vhost-user protocol.
//!
//! The command line is final; the data path is built by the networking
//! work. Until then the binary validates its arguments and refuses to run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

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
    #[arg(long, value_name = "NAME")]
    tap: String,
    /// Number of queues (RX and TX pairs times two).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=32))]
    queues: u16,
    /// Entries per queue (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// The guest's MAC address.
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,
    /// The MTU offered to the guest.
    #[arg(long, value_name = "N")]
    mtu: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.queue_size.is_power_of_two() || cli.queues % 2 != 0 {
        eprintln!(
            "vhost-user-net: --queues must be even and --queue-size a power of two, got {} and {}",
            cli.queues, cli.queue_size
        );
        return ExitCode::from(2);
    }
    if cli.tap.is_empty() || cli.tap.len() >= 16 {
        eprintln!(
            "vhost-user-net: {:?} is not a valid interface name",
            cli.tap
        );
        return ExitCode::from(2);
    }
    eprintln!("vhost-user-net: the network data path is not built yet");
    ExitCode::from(1)
}
