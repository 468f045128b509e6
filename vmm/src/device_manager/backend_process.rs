//! Starts a device backend process for a drive that names a host file or
//! an interface that names a TAP: the
//! VMM creates the listening socket, connects to it itself, removes its path
//! (nobody else can connect), and hands the listening end to the backend as
//! fd 3. The backend dies with the VMM (PR_SET_PDEATHSIG), and its exit is
//! logged with the drive it served.
//!
//! A jailed VMM cannot start processes usefully, so it asks the jailer's
//! launcher (`--backend-launcher-fd`) instead: the VMM opens the drive's
//! file inside its own jail and sends that fd; the launcher opens the TAP
//! in the VMM's network namespace; each backend gets a jail of its own.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use jailer::launch::{BackendKind, LaunchChannel, LaunchError, LaunchRequest};
use tessera_seccomp::Filters;

/// Errors starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendProcessError {
    #[error("the backend binary {0} does not exist; build it or pass --vhost-user-blk-bin or --vhost-user-net-bin")]
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
}

/// How backends are started.
#[derive(Debug, Clone)]
enum Starter {
    /// fork and exec the binary ourselves.
    Exec(PathBuf),
    /// Ask the jailer's launcher.
    Launcher(Arc<LaunchChannel>),
}

/// The fd number the backend finds its listening socket at.
const BACKEND_LISTEN_FD: RawFd = 3;

/// Starts backend processes, one per device.
#[derive(Debug, Clone)]
pub struct BackendSpawner {
    starter: Starter,
    run_dir: PathBuf,
    /// What a device is called in log lines: "drive" or "interface".
    kind: &'static str,
    /// The VMM's filters: the thread that waits for a backend installs
    /// "vmm", and backends of an unconfined VMM run unconfined too.
    seccomp: Arc<Filters>,
}

impl BackendSpawner {
    /// Uses `binary` for devices of `kind` ("drive", "interface"), or the
    /// jailer's `launcher` when there is one; sockets are created briefly
    /// in `run_dir`.
    pub fn new(
        binary: PathBuf,
        launcher: Option<Arc<LaunchChannel>>,
        run_dir: PathBuf,
        kind: &'static str,
        seccomp: Arc<Filters>,
    ) -> Result<Self, BackendProcessError> {
        let starter = match launcher {
            Some(channel) => Starter::Launcher(channel),
            None if !binary.is_file() => {
                return Err(BackendProcessError::MissingBinary(
                    binary.display().to_string(),
                ))
            }
            None => Starter::Exec(binary),
        };
        Ok(Self {
            starter,
            run_dir,
            kind,
            seccomp,
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
    pub fn spawn(
        &self,
        id: &str,
        target: BackendTarget,
        args: &[String],
    ) -> Result<UnixStream, BackendProcessError> {
        let (listener, stream) = self.listen(id)?;
        match &self.starter {
            Starter::Exec(binary) => {
                let mut all: Vec<String> = match target {
                    BackendTarget::Disk { path, read_only } => {
                        let mut disk = vec!["--path".to_string(), path.to_string()];
                        if read_only {
                            disk.push("--readonly".into());
                        }
                        disk
                    }
                    BackendTarget::Tap { name, queue_pairs } => vec![
                        "--tap".to_string(),
                        name.to_string(),
                        "--queues".to_string(),
                        (2 * queue_pairs).to_string(),
                    ],
                };
                all.extend_from_slice(args);
                self.exec(binary, id, &all, listener)?
            }
            Starter::Launcher(channel) => self.launch(channel, id, target, args, listener)?,
        }
        Ok(stream)
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

    fn exec(
        &self,
        binary: &Path,
        id: &str,
        args: &[String],
        listener: UnixListener,
    ) -> Result<(), BackendProcessError> {
        let listen_fd = listener.as_raw_fd();
        let mut command = Command::new(binary);
        command
            .arg("--fd")
            .arg(BACKEND_LISTEN_FD.to_string())
            .args(args)
            .stdin(Stdio::null());
        if self.seccomp.is_disabled() {
            command.arg("--no-seccomp");
        }
        // SAFETY: the closure only makes async-signal-safe calls (dup2,
        // fcntl, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if listen_fd == BACKEND_LISTEN_FD {
                    let flags = libc::fcntl(listen_fd, libc::F_GETFD);
                    libc::fcntl(listen_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(listen_fd, BACKEND_LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|source| BackendProcessError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        drop(listener);
        let pid = child.id();
        let id = id.to_string();
        let binary = binary.to_path_buf();
        let kind = self.kind;
        let seccomp = self.seccomp.clone();
        log::info!("{kind} {id}: started {} (pid {pid})", binary.display());
        std::thread::Builder::new()
            .name(format!("wait_{id}"))
            .spawn(move || {
                if let Err(err) = seccomp.apply("vmm") {
                    log::error!("{kind} {id}: {err}; not waiting for backend {pid}");
                    return;
                }
                match child.wait() {
                    Ok(status) if status.success() => {
                        log::info!("{kind} {id}: backend (pid {pid}) exited: {status}")
                    }
                    Ok(status) => log::error!("{kind} {id}: backend (pid {pid}) died: {status}"),
                    Err(err) => log::error!("{kind} {id}: cannot wait for backend {pid}: {err}"),
                }
            })
            .map_err(|source| BackendProcessError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        Ok(())
    }

    /// Has the jailer's launcher start the backend. A disk is opened
    /// here, inside the VMM's jail, and sent as an fd; a TAP is opened by
    /// the launcher in the VMM's network namespace.
    fn launch(
        &self,
        channel: &LaunchChannel,
        id: &str,
        target: BackendTarget,
        args: &[String],
        listener: UnixListener,
    ) -> Result<(), BackendProcessError> {
        let launch_err = |source| BackendProcessError::Launch {
            kind: self.kind,
            source,
        };
        let mut args = args.to_vec();
        let pid = match target {
            BackendTarget::Disk { path, read_only } => {
                let disk = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)
                    .map_err(|source| BackendProcessError::OpenDisk {
                        path: path.to_string(),
                        source,
                    })?;
                if read_only {
                    args.push("--readonly".into());
                }
                let request = LaunchRequest {
                    kind: BackendKind::Blk,
                    device_id: id.to_string(),
                    args,
                    tap: None,
                    tap_queue_pairs: 0,
                };
                channel
                    .launch(&request, &[listener.as_raw_fd(), disk.as_raw_fd()])
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
                };
                channel
                    .launch(&request, &[listener.as_raw_fd()])
                    .map_err(launch_err)?
            }
        };
        log::info!(
            "{} {id}: the jailer's launcher started its backend (pid {pid})",
            self.kind
        );
        Ok(())
    }

    /// The directory backend sockets are created in.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}
