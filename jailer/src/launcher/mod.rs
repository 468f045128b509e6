//! The sibling-backend launcher: a root process the jailer forks for a
//! `tessera*` VMM (after joining `--netns`, before the mount namespace and
//! the privilege drop), which starts each device backend in a jail of its
//! own on the VMM's request ([`jailer::launch`] is the protocol).
//!
//! # Trust boundary
//!
//! The launcher is root, in the VMM's network namespace; its only input is
//! the jailed, untrusted VMM's messages on a SEQPACKET socketpair. Before
//! it reads the first one it confines itself: a mount namespace of its own
//! where it can write only the VM's instance directory and the cgroups
//! ([`mounts`]), only the capabilities it uses ([`KEPT_CAPABILITIES`]),
//! and its own seccomp filter ([`confine`]). And:
//!
//! - a message is at most [`jailer::launch::MAX_MESSAGE_BYTES`] of JSON
//!   (longer ones, or ones with more fds than a request may carry, are
//!   refused whole) into fixed, closed types (`deny_unknown_fields`);
//! - it takes no paths: the backend binaries, the jail base, uid/gid,
//!   cgroups and limits all come from the jailer's own command line; the
//!   device id must pass the instance id rule, the backend flags a
//!   whitelist per kind whose values are numbers, a MAC, an enum or a
//!   short printable serial ([`validate`]);
//! - the only resources it hands out are fds the VMM already holds (its
//!   listening socket and disk file, checked by type) and the queues of a
//!   TAP that already exists in the VMM's network namespace, that the
//!   VMM's uid or gid owns (or, with `--netns`, that nobody owns) and that
//!   nobody has attached ([`tap`]);
//! - at most [`jailer::launch::MAX_BACKENDS`] backends run at a time, one
//!   per device id, and at most [`jailer::launch::MAX_BACKEND_STARTS`] are
//!   started in the VM's life; a backend's jail and cgroup are removed as
//!   soon as it ends;
//! - each backend is as confined as the VMM (own jail, mount namespace,
//!   rlimits, backend uid/gid, no capabilities, no device nodes), in a
//!   child of the VM's cgroup (so under the VM's `--cgroup` limits), in an
//!   empty network namespace unless it is a net backend, and dies with the
//!   launcher (PR_SET_PDEATHSIG).
//!
//! A bad request gets `Failed { error }` and the launcher keeps serving.
//! It reaps its backends as they die (logging the device and status on its
//! stderr). At EOF (the VMM exited or closed the channel) it sends SIGTERM
//! to the backends still running, waits for them (SIGKILL after 5 s),
//! removes their cgroups and the VMM's (retrying while the VMM's last
//! tasks leave it), and exits 0. It ignores SIGINT, SIGHUP and SIGQUIT, so
//! that a terminal's ^C kills the VMM and the launcher then cleans up.

pub mod mounts;
pub mod spawn;
pub mod tap;
pub mod validate;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jailer::launch::{
    receive_message, respond, BackendKind, LaunchError, LaunchRequest, LaunchResponse, MAX_BACKENDS,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, signal, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{dup2, fork, ForkResult, Pid};

use crate::cgroup::{CgroupPlan, CgroupSet};
use crate::resource_limits::ResourceLimits;

/// Signals the launcher ignores (and its children reset before exec).
pub const IGNORED_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGPIPE,
];

/// The capabilities the launcher keeps: CAP_SYS_ADMIN (a backend's
/// namespaces, bind mount and pivot_root), CAP_SETUID, CAP_SETGID and
/// CAP_SETPCAP (its drop to the backend uid/gid with an empty bounding
/// set), CAP_SYS_RESOURCE (its rlimits), CAP_NET_ADMIN (TUNSETIFF on a TAP
/// root does not own) and CAP_KILL (SIGTERM to backends of another uid).
pub const KEPT_CAPABILITIES: [u32; 7] = [
    21, // CAP_SYS_ADMIN
    7,  // CAP_SETUID
    6,  // CAP_SETGID
    8,  // CAP_SETPCAP
    24, // CAP_SYS_RESOURCE
    12, // CAP_NET_ADMIN
    5,  // CAP_KILL
];

/// The launcher's seccomp filter (thread kind `launcher`), compiled from
/// resources/seccomp/launcher.json and the backends' filters by build.rs.
const SECCOMP_FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));
/// The launcher's one thread kind.
pub const SECCOMP_KIND: &str = "launcher";

/// How long backends get to exit on SIGTERM at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long the launcher waits for the VMM's cgroups to empty.
const VMM_CGROUP_PATIENCE: Duration = Duration::from_secs(30);

/// What the launcher needs from the jailer's command line.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    pub id: String,
    /// The VM's instance directory, `<base>/<vmm-exe>/<id>`: the backends'
    /// jails are made in it.
    pub vm_dir: PathBuf,
    /// The backends' uid and gid.
    pub uid: u32,
    pub gid: u32,
    pub blk_bin: PathBuf,
    pub net_bin: PathBuf,
    pub vsock_bin: PathBuf,
    pub limits: ResourceLimits,
    /// The VMM's cgroups (the backends get the same hierarchies).
    pub cgroups: CgroupPlan,
    /// Stderr to /dev/null too (`--daemonize`).
    pub quiet: bool,
    pub last_cap: u32,
    /// Which TAPs the VMM may have.
    pub taps: tap::TapPolicy,
    /// The most backends to start in the VM's life
    /// ([`MAX_BACKEND_STARTS`]).
    pub max_starts: usize,
}

/// Errors starting the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("cannot create the backend launcher's socketpair: {0}")]
    Socketpair(nix::Error),
    #[error("cannot fork the backend launcher: {0}")]
    Fork(nix::Error),
    #[error("cannot pass the backend launcher fd to the VMM: {0}")]
    Cloexec(nix::Error),
}

/// Forks the launcher; returns the VMM's end of the channel (inherited
/// across exec) and the launcher's pid. The child never returns. `vmm_cgroups` are the cgroups
/// the caller is in: the launcher leaves them and removes them at the end.
pub fn start(
    config: LauncherConfig,
    vmm_cgroups: &mut CgroupSet,
) -> Result<(OwnedFd, Pid), LauncherError> {
    let (vmm_end, launcher_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(LauncherError::Socketpair)?;
    // SAFETY: the jailer is single-threaded, so the child may run any code.
    match unsafe { fork() }.map_err(LauncherError::Fork)? {
        ForkResult::Child => {
            drop(vmm_end);
            let cgroups = std::mem::take(vmm_cgroups);
            let code = run(config, launcher_end, cgroups);
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop(launcher_end);
            nix::fcntl::fcntl(
                vmm_end.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(LauncherError::Cloexec)?;
            Ok((vmm_end, child))
        }
    }
}

pub(crate) fn log(message: std::fmt::Arguments<'_>) {
    eprintln!("jailer launcher: {message}");
}

/// One running backend.
struct Backend {
    device_id: String,
    kind: BackendKind,
    cgroups: CgroupSet,
    /// Its jail's directory, removed when it ends.
    instance: PathBuf,
}

/// The launcher's state.
struct Launcher {
    config: LauncherConfig,
    backends: HashMap<Pid, Backend>,
    /// Requests that got as far as building a jail.
    starts: usize,
}

fn run(config: LauncherConfig, channel: OwnedFd, mut vmm_cgroups: CgroupSet) -> i32 {
    vmm_cgroups.leave_self();
    for sig in IGNORED_SIGNALS {
        // SAFETY: SIG_IGN installs no handler.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = dup2(null.as_raw_fd(), 0);
        let _ = dup2(null.as_raw_fd(), 1);
        if config.quiet {
            let _ = dup2(null.as_raw_fd(), 2);
        }
    }
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    if let Err(err) = mask.thread_block() {
        log(format_args!("cannot block SIGCHLD: {err}"));
        return 1;
    }
    let sigfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(fd) => fd,
        Err(err) => {
            log(format_args!("cannot create a signalfd: {err}"));
            return 1;
        }
    };
    let view = mounts::reachable(
        &config.vm_dir,
        &[&config.blk_bin, &config.net_bin, &config.vsock_bin],
    );
    if let Err(err) = mounts::confine_mounts(&view) {
        log(format_args!("{err}"));
        return 1;
    }
    if let Err(err) = confine(config.last_cap) {
        log(format_args!("{err}"));
        return 1;
    }
    let mut launcher = Launcher {
        config,
        backends: HashMap::new(),
        starts: 0,
    };
    launcher.serve(&channel, &sigfd);
    drop(channel);
    launcher.shutdown(&sigfd);
    for (path, errno) in vmm_cgroups.remove(VMM_CGROUP_PATIENCE) {
        log(format_args!(
            "cannot remove the VMM's cgroup {}: {errno}",
            path.display()
        ));
    }
    0
}

/// Errors confining the launcher.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot drop the launcher's capabilities: {0}")]
    Capabilities(#[from] crate::privileges::PrivilegeError),
    #[error("cannot confine the launcher: {0}")]
    Seccomp(#[from] tessera_seccomp::SeccompError),
}

/// Keeps only [`KEPT_CAPABILITIES`] and installs the launcher's seccomp
/// filter, before it reads its first request. Its children (and so the
/// backends) inherit both; a backend then drops every capability and
/// stacks its own filter.
pub fn confine(last_cap: u32) -> Result<(), ConfineError> {
    crate::privileges::keep_only(crate::privileges::mask(&KEPT_CAPABILITIES), last_cap)?;
    tessera_seccomp::Filters::decode(SECCOMP_FILTERS)?.apply(SECCOMP_KIND)?;
    Ok(())
}

impl Launcher {
    fn serve(&mut self, channel: &OwnedFd, sigfd: &SignalFd) {
        loop {
            let mut fds = [
                PollFd::new(channel.as_fd(), PollFlags::POLLIN),
                PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(err) => {
                    log(format_args!("poll failed: {err}"));
                    return;
                }
            }
            let channel_ready = fds[0].any().unwrap_or(false);
            let child_ready = fds[1].any().unwrap_or(false);
            if child_ready {
                while let Ok(Some(_)) = sigfd.read_signal() {}
                self.reap();
            }
            if channel_ready {
                match receive_message(channel.as_fd()) {
                    Ok(None) => return,
                    Ok(Some((body, fds))) => {
                        let response = match self.handle(&body, fds) {
                            Ok(pid) => LaunchResponse::Started { pid },
                            Err(error) => {
                                log(format_args!("refused a request: {error}"));
                                LaunchResponse::Failed { error }
                            }
                        };
                        if let Err(err) = respond(channel.as_fd(), &response) {
                            log(format_args!("cannot answer the VMM: {err}"));
                            return;
                        }
                    }
                    Err(err @ (LaunchError::Truncated | LaunchError::TooManyFds(_))) => {
                        log(format_args!("refused a request: {err}"));
                        let response = LaunchResponse::Failed {
                            error: err.to_string(),
                        };
                        if respond(channel.as_fd(), &response).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        log(format_args!("{err}"));
                        return;
                    }
                }
            }
        }
    }

    /// Checks and carries out one request.
    fn handle(&mut self, body: &[u8], fds: Vec<OwnedFd>) -> Result<u32, String> {
        let request: LaunchRequest =
            serde_json::from_slice(body).map_err(|err| format!("invalid request: {err}"))?;
        validate::check_request(&request)?;
        validate::check_fds(request.kind, &fds)?;
        if self.backends.len() >= MAX_BACKENDS {
            return Err(format!("{MAX_BACKENDS} backends are running already"));
        }
        if self.starts >= self.config.max_starts {
            return Err(format!(
                "{} backends were started already: no more for this VM",
                self.starts
            ));
        }
        // A new backend for a device replaces the old one, which must not
        // touch the guest's queues any more (the VMM saw it hang up, or
        // stop answering).
        let old = self
            .backends
            .iter()
            .find(|(_, b)| b.device_id == request.device_id)
            .map(|(pid, _)| *pid);
        if let Some(pid) = old {
            self.retire(pid);
        }
        let mut fds = fds;
        if request.kind == BackendKind::Net {
            let tap = request.tap.as_deref().unwrap_or_default();
            fds.extend(
                tap::open_tap(tap, request.tap_queue_pairs, &self.config.taps)
                    .map_err(|err| err.to_string())?,
            );
        }
        self.starts += 1;
        let spawned = spawn::spawn(&self.config, &request, fds)?;
        let pid = spawned.pid;
        log(format_args!(
            "started the {:?} backend for device {} (pid {pid})",
            request.kind, request.device_id
        ));
        self.backends.insert(
            pid,
            Backend {
                device_id: request.device_id,
                kind: request.kind,
                cgroups: spawned.cgroups,
                instance: spawned.instance,
            },
        );
        u32::try_from(pid.as_raw()).map_err(|_| format!("odd pid {pid}"))
    }

    /// Ends backend `pid` now (SIGKILL), waits for it and removes its
    /// jail and cgroups, so that a new backend for its device starts clean.
    fn retire(&mut self, pid: Pid) {
        let _ = kill(pid, Signal::SIGKILL);
        let status = waitpid(pid, None);
        if let Some(backend) = self.backends.remove(&pid) {
            log(format_args!(
                "replaced the {:?} backend for device {} (pid {pid}): {}",
                backend.kind,
                backend.device_id,
                status.map_or_else(|err| err.to_string(), describe)
            ));
            self.clean_up(backend);
        }
    }

    fn clean_up(&mut self, mut backend: Backend) {
        for (path, errno) in backend.cgroups.remove(Duration::from_secs(1)) {
            log(format_args!(
                "cannot remove cgroup {}: {errno}",
                path.display()
            ));
        }
        if let Err(err) = spawn::remove_jail(&backend.instance) {
            log(format_args!("{err}"));
        }
    }

    /// Reaps every backend that has exited.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if let Some(backend) = self.backends.remove(&pid) {
                        log(format_args!(
                            "the {:?} backend for device {} (pid {pid}) exited: {}",
                            backend.kind,
                            backend.device_id,
                            describe(status)
                        ));
                        self.clean_up(backend);
                    }
                }
            }
        }
    }

    /// SIGTERM to every backend, then wait (SIGKILL after the grace time).
    fn shutdown(&mut self, sigfd: &SignalFd) {
        for pid in self.backends.keys() {
            let _ = kill(*pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + TERM_GRACE;
        let mut killed = false;
        while !self.backends.is_empty() {
            self.reap();
            if self.backends.is_empty() {
                break;
            }
            if Instant::now() >= deadline && !killed {
                for pid in self.backends.keys() {
                    log(format_args!(
                        "backend pid {pid} ignored SIGTERM: killing it"
                    ));
                    let _ = kill(*pid, Signal::SIGKILL);
                }
                killed = true;
            }
            let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(100u8));
            while let Ok(Some(_)) = sigfd.read_signal() {}
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jailer::launch::request_launch;
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    /// A launcher for VM `vm` whose blk "backend" is `/bin/true` (it exits
    /// at once), with its instance directory in `dir`.
    fn config(dir: &Path, max_starts: usize) -> LauncherConfig {
        let true_bin = std::fs::canonicalize("/bin/true").unwrap();
        LauncherConfig {
            id: "vm".into(),
            vm_dir: dir.join("tessera").join("vm"),
            uid: 4321,
            gid: 4321,
            blk_bin: true_bin.clone(),
            net_bin: true_bin.clone(),
            vsock_bin: true_bin,
            limits: ResourceLimits::default(),
            cgroups: CgroupPlan {
                version: crate::cgroup::CgroupVersion::V1,
                parent: "unused".into(),
                hierarchies: Vec::new(),
            },
            quiet: false,
            last_cap: crate::privileges::prepare(),
            taps: tap::TapPolicy {
                uid: 1234,
                gid: 1234,
                private_netns: false,
            },
            max_starts,
        }
    }

    fn blk(device_id: &str) -> LaunchRequest {
        LaunchRequest {
            kind: BackendKind::Blk,
            device_id: device_id.into(),
            args: Vec::new(),
            tap: None,
            tap_queue_pairs: 0,
            uds_path: None,
        }
    }

    /// Bytes in the files under `dir` (0 if it is gone).
    fn bytes_under(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => bytes_under(&e.path()),
                _ => e.metadata().map(|m| m.len()).unwrap_or(0),
            })
            .sum()
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// A call made by a confined child; it returns the exit status.
    type ConfinedCall = fn() -> i32;

    /// How a forked child ends that confines itself as the launcher and
    /// then runs `call`, which returns the exit status.
    fn confined(call: ConfinedCall) -> WaitStatus {
        // SAFETY: the child only confines itself, makes one call and exits.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = match confine(crate::privileges::prepare()) {
                    Ok(()) => call(),
                    Err(_) => 100,
                };
                // SAFETY: _exit ends the child without running the test
                // harness's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).unwrap(),
        }
    }

    #[test]
    fn the_confined_launcher_keeps_few_capabilities_and_forbidden_calls_kill_it() {
        if !crate::test_support::runs_as_root() {
            return;
        }
        let kept = crate::privileges::mask(&KEPT_CAPABILITIES);
        let caps = |child: Pid| -> Vec<(String, u64)> {
            let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
            status
                .lines()
                .filter_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    let value = u64::from_str_radix(value.trim(), 16).ok()?;
                    key.starts_with("Cap").then(|| (key.to_string(), value))
                })
                .collect()
        };
        // What it may do: its capabilities, read while it waits.
        let (to_parent, from_child) = nix::unistd::pipe().unwrap();
        let (to_child, from_parent) = nix::unistd::pipe().unwrap();
        // SAFETY: the child confines itself, signals, waits and exits.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let ok = confine(crate::privileges::prepare()).is_ok();
                let _ = nix::unistd::write(&from_child, &[u8::from(ok)]);
                let mut byte = [0u8];
                let _ = nix::unistd::read(to_child.as_raw_fd(), &mut byte);
                // SAFETY: as above.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                let mut ok = [0u8];
                nix::unistd::read(to_parent.as_raw_fd(), &mut ok).unwrap();
                let seen = caps(child);
                nix::unistd::write(&from_parent, b"x").unwrap();
                assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
                assert_eq!(ok, [1], "confine failed");
                // What this test process has (a container may hold back
                // some), less all but the kept ones.
                let own: HashMap<String, u64> = caps(nix::unistd::getpid()).into_iter().collect();
                for (key, value) in seen {
                    let want = match key.as_str() {
                        "CapInh" | "CapAmb" => 0,
                        _ => kept & own[&key],
                    };
                    assert_eq!(value, want, "{key} {value:#x}");
                }
            }
        }
        // What it may not: each of these is killed with SIGSYS.
        let forbidden: [(&str, ConfinedCall); 6] = [
            ("a remount", || {
                // SAFETY: a syscall with null pointers for what it ignores.
                unsafe {
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND,
                        std::ptr::null(),
                    )
                }
            }),
            ("a user namespace", || {
                // SAFETY: a syscall with integer arguments.
                unsafe { libc::unshare(libc::CLONE_NEWUSER) }
            }),
            ("setns", || {
                // SAFETY: a syscall with plain integer arguments.
                unsafe { libc::syscall(libc::SYS_setns, -1, 0) as i32 }
            }),
            ("ptrace", || {
                // SAFETY: as above; PTRACE_TRACEME touches no memory.
                unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) as i32 }
            }),
            ("an inet socket", || {
                // SAFETY: as above.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
            }),
            ("SIGUSR1 to a process", || {
                // SAFETY: as above.
                unsafe { libc::kill(1, libc::SIGUSR1) }
            }),
        ];
        for (what, call) in forbidden {
            match confined(call) {
                WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
                other => panic!("{what}: {other:?}, not SIGSYS"),
            }
        }
        // A netlink socket, which it needs, is fine.
        let netlink = confined(|| {
            // SAFETY: as above.
            let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
            i32::from(fd < 0)
        });
        assert!(matches!(netlink, WaitStatus::Exited(_, 0)), "{netlink:?}");
    }

    #[test]
    fn backends_that_exit_leave_no_jail_and_starts_are_capped() {
        if !crate::test_support::runs_as_root() {
            return;
        }
        const STARTS: usize = 12;
        let dir = std::env::temp_dir().join(format!("jailer-starts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, STARTS);
        let jails = cfg.vm_dir.clone();
        std::fs::create_dir_all(&jails).unwrap();
        let (channel, launcher) = start(cfg, &mut CgroupSet::default()).unwrap();
        let listener = UnixListener::bind(dir.join("sock")).unwrap();
        let disk = std::fs::File::create(dir.join("disk")).unwrap();
        let stats = backend_stats::StatsPage::create().unwrap();
        let fds = [
            listener.as_raw_fd(),
            stats.fd().unwrap().as_raw_fd(),
            disk.as_raw_fd(),
        ];
        for i in 0..STARTS {
            let started = request_launch(channel.as_fd(), &blk(&format!("d{i}")), &fds);
            assert!(started.is_ok(), "start {i}: {started:?}");
        }
        // Each "backend" exits at once: its jail goes with it.
        let emptied = wait_for(|| !jails.join("true").exists());
        assert!(
            emptied,
            "{} bytes of jails left after {STARTS} starts",
            bytes_under(&jails)
        );
        // No backend runs, but the VM has used up its starts.
        match request_launch(channel.as_fd(), &blk("one-more"), &fds) {
            Err(LaunchError::Failed(error)) => {
                assert!(error.contains("12 backends were started"), "{error}")
            }
            other => panic!("start {STARTS} was not refused: {other:?}"),
        }
        assert!(!jails.join("true").join("one-more").exists());
        // The launcher sees only its view: a read-only tmpfs root, the
        // instance directory and the cgroup hierarchies writable, the
        // rest read-only (of the mounts stacked on one point, the last is
        // the one seen).
        let mountinfo = std::fs::read_to_string(format!("/proc/{launcher}/mountinfo")).unwrap();
        let entries = mounts::parse_mountinfo(&mountinfo);
        let root = entries.iter().rev().find(|e| e.point == Path::new("/"));
        assert!(
            root.is_some_and(|r| r.fstype == "tmpfs" && r.options.split(',').any(|o| o == "ro")),
            "{mountinfo}"
        );
        for (at, entry) in entries.iter().enumerate() {
            if entries[at + 1..].iter().any(|e| e.point == entry.point) {
                continue;
            }
            let writable = entry.options.split(',').any(|o| o == "rw");
            let may_write = entry.point.starts_with(&jails) || entry.fstype.starts_with("cgroup");
            assert!(!writable || may_write, "the launcher may write {entry:?}");
            let needed = entry.point == Path::new("/")
                || entry.point.starts_with(&jails)
                || entry.point.starts_with("/sys/fs/cgroup")
                || entry.point.starts_with("/dev")
                || crate::libs::LIBRARY_DIRS
                    .iter()
                    .any(|d| entry.point.starts_with(d))
                || entry.point.file_name().is_some_and(|n| n == "true");
            assert!(needed, "the launcher can reach {entry:?}");
        }
        drop(channel);
        assert_eq!(
            waitpid(launcher, None).unwrap(),
            WaitStatus::Exited(launcher, 0)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
