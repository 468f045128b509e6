//! The backend starter: the process that starts an unjailed VMM's device
//! backends, at boot and whenever one has to be replaced.
//!
//! A VMM thread under its seccomp filter cannot fork and exec, and a child
//! would inherit the filter anyway. So before any filter is applied, the
//! VMM starts this process (its own executable with `--backend-starter
//! <binary>`): unconfined and single-threaded, it reads launch requests in
//! the jailer launcher's protocol (a `LaunchRequest` with the backend's
//! listening socket, its stats page and, for a disk, the disk's fd), checks them as the
//! launcher does, and starts the backend with them. It ends when the VMM
//! closes the channel or dies (PR_SET_PDEATHSIG), and its backends with it
//! (theirs). It runs under its own seccomp filter
//! (`resources/seccomp/backend-starter.json`, widened by the backends'
//! rules since they inherit it). Under the jailer, the jailer's launcher
//! plays this part.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use jailer::launch::{
    receive_message, respond, BackendKind, LaunchChannel, LaunchError, LaunchRequest,
    LaunchResponse, MAX_BACKENDS,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// The starter's filter: backend-starter.json widened by the backends'
/// rules (a backend runs under it and its own, stacked).
const SECCOMP_FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/starter.bpf"));

/// Where the starter finds its channel, and each backend its listening
/// socket; its stats page and a disk's fd follow it.
const CHANNEL_FD: RawFd = 3;
const FIRST_BACKEND_FD: RawFd = 3;
/// How often the starter reaps backends while no request comes.
const REAP_INTERVAL_MS: u16 = 500;

/// Starts the starter for `binary`; returns the VMM's end of its channel.
pub fn spawn(binary: &Path, no_seccomp: bool) -> std::io::Result<LaunchChannel> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--backend-starter").arg(binary);
    if no_seccomp {
        command.arg("--no-seccomp");
    }
    let channel = theirs.as_raw_fd();
    // SAFETY: the closure only makes async-signal-safe calls (dup2, fcntl,
    // prctl) between fork and exec.
    unsafe {
        command.stdin(Stdio::null()).pre_exec(move || {
            move_fd(channel, CHANNEL_FD)?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()?;
    drop(theirs);
    Ok(LaunchChannel::new(ours))
}

/// Makes `fd` available as `target` in a child about to exec (between fork
/// and exec: async-signal-safe calls only).
fn move_fd(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl and dup2 on fds this process owns; no memory is touched.
    unsafe {
        if fd == target {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        } else if libc::dup2(fd, target) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The starter's life: serves the channel at fd 3 until the VMM closes it;
/// returns the exit status.
pub fn run(binary: PathBuf, no_seccomp: bool) -> i32 {
    // SAFETY: the VMM put the channel at fd 3 for this process, which owns
    // it from here on.
    let channel = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    if !no_seccomp {
        let confined = tessera_seccomp::Filters::decode(SECCOMP_FILTERS)
            .and_then(|filters| filters.apply("starter"));
        if let Err(err) = confined {
            eprintln!("tessera backend starter: {err}; not starting unconfined");
            return 1;
        }
    }
    let mut starter = Starter {
        binary,
        no_seccomp,
        children: Vec::new(),
    };
    loop {
        let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(REAP_INTERVAL_MS)) {
            Ok(0) | Err(nix::Error::EINTR) => {
                starter.reap();
                continue;
            }
            Ok(_) => {}
            Err(err) => {
                eprintln!("tessera backend starter: poll failed: {err}");
                return 1;
            }
        }
        starter.reap();
        let response = match receive_message(channel.as_fd()) {
            Ok(None) => return 0,
            Ok(Some((body, fds))) => match starter.start(&body, fds) {
                Ok(pid) => LaunchResponse::Started { pid },
                Err(error) => LaunchResponse::Failed { error },
            },
            Err(err @ (LaunchError::Truncated | LaunchError::TooManyFds(_))) => {
                LaunchResponse::Failed {
                    error: err.to_string(),
                }
            }
            Err(err) => {
                eprintln!("tessera backend starter: {err}");
                return 1;
            }
        };
        if respond(channel.as_fd(), &response).is_err() {
            return 0;
        }
    }
}

struct Starter {
    binary: PathBuf,
    no_seccomp: bool,
    /// Running backends, with the device each serves.
    children: Vec<(Child, String)>,
}

impl Starter {
    /// Checks one request as the jailer's launcher does and starts its
    /// backend with `fds` (the listening socket, the stats page, then a
    /// disk or the vsock host socket).
    fn start(&mut self, body: &[u8], fds: Vec<OwnedFd>) -> Result<u32, String> {
        let request: LaunchRequest =
            serde_json::from_slice(body).map_err(|err| format!("invalid request: {err}"))?;
        jailer::id::validate_device_id(&request.device_id)
            .map_err(|err| format!("invalid device id: {err}"))?;
        jailer::backend_flags::check_args(request.kind, &request.args)
            .map_err(|err| err.to_string())?;
        self.retire(&request.device_id);
        if self.children.len() >= MAX_BACKENDS {
            return Err(format!("{MAX_BACKENDS} backends are running already"));
        }
        let expected = match request.kind {
            BackendKind::Blk | BackendKind::Vsock => 3,
            BackendKind::Net => 2,
        };
        if fds.len() != expected {
            return Err(format!(
                "a {:?} request carries {expected} fds, not {}",
                request.kind,
                fds.len()
            ));
        }
        let fd_at = |position: RawFd| (FIRST_BACKEND_FD + position).to_string();
        let mut command = Command::new(&self.binary);
        command
            .arg("--fd")
            .arg(fd_at(0))
            .arg("--stats-fd")
            .arg(fd_at(1))
            .stdin(Stdio::null());
        match request.kind {
            BackendKind::Blk => {
                command.arg("--disk-fd").arg(fd_at(2));
            }
            BackendKind::Net => {
                let tap = request.tap.as_deref().ok_or("a net request needs a tap")?;
                tap.parse::<tessera_types::TapName>()
                    .map_err(|err| err.to_string())?;
                command.arg("--tap").arg(tap);
            }
            BackendKind::Vsock => {
                let path = request
                    .uds_path
                    .as_deref()
                    .ok_or("a vsock request needs a uds_path")?;
                command
                    .arg("--uds-path")
                    .arg(path)
                    .arg("--uds-fd")
                    .arg(fd_at(2));
            }
        }
        command.args(&request.args);
        if self.no_seccomp {
            command.arg("--no-seccomp");
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        // Every fd is parked above all of them first, so that moving one
        // into place cannot overwrite another.
        let park = raw
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(FIRST_BACKEND_FD + 3)
            + 1;
        // SAFETY: the closure only makes async-signal-safe calls (dup2,
        // fcntl, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, park + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..raw.len() {
                    move_fd(park + i as RawFd, FIRST_BACKEND_FD + i as RawFd)?;
                    libc::close(park + i as RawFd);
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", self.binary.display()))?;
        let pid = child.id();
        self.children.push((child, request.device_id));
        Ok(pid)
    }

    /// Ends the running backend of `device`, if any (a new one replaces
    /// it, and the old one must not touch the guest's queues any more).
    fn retire(&mut self, device: &str) {
        self.children.retain_mut(|(child, served)| {
            if served != device {
                return true;
            }
            let _ = child.kill();
            match child.wait() {
                Ok(status) => eprintln!(
                    "tessera backend starter: replaced the backend of {device} (pid {}): {status}",
                    child.id()
                ),
                Err(err) => eprintln!(
                    "tessera backend starter: cannot wait for {}: {err}",
                    child.id()
                ),
            }
            false
        });
    }

    /// Reaps the backends that ended, logging how.
    fn reap(&mut self) {
        self.children
            .retain_mut(|(child, device)| match child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    eprintln!(
                        "tessera backend starter: the backend of {device} (pid {}) ended: {status}",
                        child.id()
                    );
                    false
                }
                Err(_) => false,
            });
    }
}
