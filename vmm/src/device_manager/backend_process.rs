//! Starts a device backend process for a drive that names a host file or
//! an interface that names a TAP: the
//! VMM creates the listening socket, connects to it itself, removes its path
//! (nobody else can connect), and hands the listening end to the backend as
//! fd 3. The backend dies with the VMM (PR_SET_PDEATHSIG), and its exit is
//! logged with the drive it served.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

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
}

/// The fd number the backend finds its listening socket at.
const BACKEND_LISTEN_FD: RawFd = 3;

/// Starts backend processes, one per device.
#[derive(Debug, Clone)]
pub struct BackendSpawner {
    binary: PathBuf,
    run_dir: PathBuf,
    /// What a device is called in log lines: "drive" or "interface".
    kind: &'static str,
    /// The VMM's filters: the thread that waits for a backend installs
    /// "vmm", and backends of an unconfined VMM run unconfined too.
    seccomp: Arc<Filters>,
}

impl BackendSpawner {
    /// Uses `binary` for devices of `kind` ("drive", "interface"); sockets
    /// are created briefly in `run_dir`.
    pub fn new(
        binary: PathBuf,
        run_dir: PathBuf,
        kind: &'static str,
        seccomp: Arc<Filters>,
    ) -> Result<Self, BackendProcessError> {
        if !binary.is_file() {
            return Err(BackendProcessError::MissingBinary(
                binary.display().to_string(),
            ));
        }
        Ok(Self {
            binary,
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

    /// Starts the backend for device `id` with `args`; returns the
    /// frontend's end of the connection.
    pub fn spawn(&self, id: &str, args: &[String]) -> Result<UnixStream, BackendProcessError> {
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
        let stream = stream?;

        let listen_fd = listener.as_raw_fd();
        let mut command = Command::new(&self.binary);
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
                binary: self.binary.display().to_string(),
                source,
            })?;
        drop(listener);
        let pid = child.id();
        let id = id.to_string();
        let binary = self.binary.clone();
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
        Ok(stream)
    }

    /// The directory backend sockets are created in.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}
