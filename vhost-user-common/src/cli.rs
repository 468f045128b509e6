//! The flags every backend takes, flattened into each backend's own
//! `clap` parser.

use std::path::PathBuf;

use tessera_types::{InheritedFd, QueueSize};

/// The flags every Tessera vhost-user backend takes.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Listen on this Unix socket.
    #[arg(long, value_name = "PATH", required_unless_present = "fd")]
    pub socket: Option<PathBuf>,
    /// Serve an inherited, already listening socket.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    pub fd: Option<InheritedFd>,
    /// Keep the device's counters in this inherited memfd (sealed against
    /// shrinking), where the VMM reads them for its metrics.
    #[arg(long, value_name = "N")]
    pub stats_fd: Option<InheritedFd>,
    /// Run without seccomp filters (for debugging only).
    #[arg(long, conflicts_with = "seccomp_filter")]
    pub no_seccomp: bool,
    /// Load the seccomp filters (kinds "main" and "worker") from this
    /// seccompiler JSON file instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
    /// The largest queue the frontend may set up (a power of two, at most
    /// 32768). QEMU asks for 1024 entries by default.
    #[arg(long, default_value = "1024")]
    pub queue_size: QueueSize,
}
