//! `vhost-user-blk`: serves one drive to a VMM over the vhost-user protocol.
//!
//! The command line is final; the data path is built by the block-storage
//! work. Until then the binary validates its arguments and refuses to run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

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
    #[arg(long, value_name = "FILE")]
    path: PathBuf,
    /// Refuse guest writes.
    #[arg(long)]
    readonly: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Number of request queues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Entries per queue (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// The serial number the guest reads with GET_ID.
    #[arg(long, value_name = "ID")]
    serial: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.queue_size.is_power_of_two() {
        eprintln!(
            "vhost-user-blk: --queue-size must be a power of two, got {}",
            cli.queue_size
        );
        return ExitCode::from(2);
    }
    if let Err(err) = std::fs::metadata(&cli.path) {
        eprintln!("vhost-user-blk: cannot use {}: {err}", cli.path.display());
        return ExitCode::from(2);
    }
    eprintln!("vhost-user-blk: the block data path is not built yet");
    ExitCode::from(1)
}
