//! Starts a device backend process for a drive that names a host file or
//! an interface that names a TAP: the VMM creates the listening socket,
//! connects to it itself, removes its path (nobody else can connect), and
//! has the backend started with the listening end as fd 3, the device's
//! stats page (its counters, which the VMM reads for the metrics; the same
//! page for every backend of the device) as fd 4 and, for a drive, the
//! disk (opened by the VMM, inside its jail if it has one) as fd 5. The starter is the jailer's launcher (`--backend-launcher-fd`),
//! which gives each backend a jail of its own and opens the TAP in the
//! VMM's network namespace, or the VMM's own backend starter
//! ([`super::backend_starter`]). Either logs how each backend ended, and
//! starts a new one for a device whose backend is gone.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backend_stats::{StatsError, StatsPage};
use jailer::launch::{BackendKind, LaunchChannel, LaunchError, LaunchRequest};
use tessera_seccomp::Filters;

/// Opens a drive's disk for its backends (inside the VMM's jail, if any).
fn open_disk(path: &str, read_only: bool) -> Result<File, BackendProcessError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BackendProcessError::OpenDisk {
            path: path.to_string(),
            source,
        })
}

/// Errors starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendProcessError {
    #[error("the backend binary {0} does not exist; build it or pass --vhost-user-blk-bin, --vhost-user-net-bin or --vhost-user-vsock-bin")]
    MissingBinary(String),
    #[error("cannot create the backend socket in {dir}: {source}")]
    Socket { dir: String, source: std::io::Error },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("cannot open the disk {path} for its backend: {source}")]
    OpenDisk {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the stats page for its backend: {0}")]
    Stats(#[from] StatsError),
    #[error("the vsock device has an external backend: no host socket to start one with")]
    NoVsockSocket,
    #[error("the jailer's launcher cannot start the {kind} backend: {source}")]
    Launch {
        kind: &'static str,
        source: LaunchError,
    },
}

/// What a backend serves.
#[derive(Debug, Clone, Copy)]
pub enum BackendTarget<'a> {
    /// A drive's image or block device.
    Disk { path: &'a str, read_only: bool },
    /// An existing TAP, with one queue per pair.
    Tap { name: &'a str, queue_pairs: u16 },
    /// A vsock device's host side: its socket path and the socket
    /// listening there (bound when the device was configured; none for a
    /// device with an external backend, which is never started).
    VsockHost {
        uds_path: &'a str,
        listener: Option<&'a UnixListener>,
    },
}

/// Starts backend processes, one per device, through the jailer's
/// launcher or the VMM's own backend starter: a VMM thread under its
/// seccomp filter never forks. The disk a drive's backend serves is opened
/// once, when its first backend starts, and handed to every later one.
#[derive(Debug, Clone)]
pub struct BackendSpawner {
    channel: Arc<LaunchChannel>,
    /// Whether `channel` is the jailer's launcher.
    jailed: bool,
    run_dir: PathBuf,
    /// What a device is called in log lines: "drive" or "interface".
    kind: &'static str,
    /// Each drive's disk, by drive id.
    disks: Arc<Mutex<HashMap<String, File>>>,
    /// Each device's stats page, by device id.
    stats: Arc<Mutex<HashMap<String, Arc<StatsPage>>>>,
}

impl BackendSpawner {
    /// Uses `binary` for devices of `kind` ("drive", "interface"), through
    /// a backend starter of its own, or the jailer's `launcher` when there
    /// is one; sockets are created briefly in `run_dir`. Call it before the
    /// thread's seccomp filter is in place.
    pub fn new(
        binary: PathBuf,
        launcher: Option<Arc<LaunchChannel>>,
        run_dir: PathBuf,
        kind: &'static str,
        seccomp: Arc<Filters>,
    ) -> Result<Self, BackendProcessError> {
        let jailed = launcher.is_some();
        let channel = match launcher {
            Some(channel) => channel,
            None if !binary.is_file() => {
                return Err(BackendProcessError::MissingBinary(
                    binary.display().to_string(),
                ))
            }
            None => Arc::new(
                super::backend_starter::spawn(&binary, seccomp.is_disabled()).map_err(
                    |source| BackendProcessError::Spawn {
                        binary: binary.display().to_string(),
                        source,
                    },
                )?,
            ),
        };
        Ok(Self {
            channel,
            jailed,
            run_dir,
            kind,
            disks: Arc::default(),
            stats: Arc::default(),
        })
    }

    /// The default backend binary: `name` next to the running executable.
    pub fn default_binary(name: &str) -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Starts the backend for device `id`, serving `target`, with the
    /// further flags `args`; returns the frontend's end of the connection.
    /// A later call for the same device replaces its backend.
    pub fn spawn(
        &self,
        id: &str,
        target: BackendTarget,
        args: &[String],
    ) -> Result<UnixStream, BackendProcessError> {
        let (listener, stream) = self.listen(id)?;
        let launch_err = |source| BackendProcessError::Launch {
            kind: self.kind,
            source,
        };
        let mut args = args.to_vec();
        let stats = self.stats_page(id)?;
        let stats_fd = stats.fd().map_or(-1, |fd| fd.as_raw_fd());
        let pid = match target {
            BackendTarget::Disk { path, read_only } => {
                let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
                let disk = match disks.entry(id.to_string()) {
                    Entry::Occupied(kept) => kept.into_mut(),
                    Entry::Vacant(slot) => slot.insert(open_disk(path, read_only)?),
                };
                if read_only {
                    args.push("--readonly".into());
                }
                let request = LaunchRequest {
                    kind: BackendKind::Blk,
                    device_id: id.to_string(),
                    args,
                    tap: None,
                    tap_queue_pairs: 0,
                    uds_path: None,
                };
                self.channel
                    .launch(
                        &request,
                        &[listener.as_raw_fd(), stats_fd, disk.as_raw_fd()],
                    )
                    .map_err(launch_err)?
            }
            BackendTarget::VsockHost {
                uds_path,
                listener: host,
            } => {
                let host = host.ok_or(BackendProcessError::NoVsockSocket)?;
                let request = LaunchRequest {
                    kind: BackendKind::Vsock,
                    device_id: id.to_string(),
                    args,
                    tap: None,
                    tap_queue_pairs: 0,
                    uds_path: Some(uds_path.to_string()),
                };
                self.channel
                    .launch(
                        &request,
                        &[listener.as_raw_fd(), stats_fd, host.as_raw_fd()],
                    )
                    .map_err(launch_err)?
            }
            BackendTarget::Tap { name, queue_pairs } => {
                args.extend(["--queues".to_string(), (2 * queue_pairs).to_string()]);
                let request = LaunchRequest {
                    kind: BackendKind::Net,
                    device_id: id.to_string(),
                    args,
                    tap: Some(name.to_string()),
                    tap_queue_pairs: queue_pairs,
                    uds_path: None,
                };
                self.channel
                    .launch(&request, &[listener.as_raw_fd(), stats_fd])
                    .map_err(launch_err)?
            }
        };
        log::info!(
            "{} {id}: {} started its backend (pid {pid})",
            self.kind,
            if self.jailed {
                "the jailer's launcher"
            } else {
                "the backend starter"
            }
        );
        Ok(stream)
    }

    /// The stats page of device `id`'s backends: created with its first
    /// backend (before the VMM thread's filter, which has no memfd_create),
    /// then handed to each one after it.
    fn stats_page(&self, id: &str) -> Result<Arc<StatsPage>, BackendProcessError> {
        let mut pages = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        match pages.entry(id.to_string()) {
            Entry::Occupied(kept) => Ok(kept.get().clone()),
            Entry::Vacant(slot) => Ok(slot.insert(Arc::new(StatsPage::create()?)).clone()),
        }
    }

    /// The counters the backends of device `id` keep, once one started.
    pub fn stats(&self, id: &str) -> Option<Arc<StatsPage>> {
        let pages = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        pages.get(id).cloned()
    }

    /// Makes `disk` the file the next backends of drive `id` get.
    pub fn replace_disk(&self, id: &str, disk: File) {
        self.disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), disk);
    }

    /// A listening socket for the backend, and our connection to it; the
    /// path is gone before anyone else could connect.
    fn listen(&self, id: &str) -> Result<(UnixListener, UnixStream), BackendProcessError> {
        let socket_err = |source| BackendProcessError::Socket {
            dir: self.run_dir.display().to_string(),
            source,
        };
        let path = self
            .run_dir
            .join(format!("tessera-{}-{id}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(socket_err)?;
        let stream = UnixStream::connect(&path).map_err(socket_err);
        let _ = std::fs::remove_file(&path);
        Ok((listener, stream?))
    }

    /// The directory backend sockets are created in.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}
