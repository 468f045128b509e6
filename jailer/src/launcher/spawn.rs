//! Starting one backend in a jail of its own:
//! `<base>/<vmm-exe>/<id>/<backend-exe>/<device>/root`, beside the VMM's
//! `root`, with a copy of the binary (removed again when the backend
//! ends), the cgroup
//! `<parent>/<id>/<device>` in the VMM's hierarchies, a child of the VM's
//! cgroup and so under all of its limits (v1: with its
//! `cpuset.cpus`/`cpuset.mems` so that it can run), the resource limits, a
//! mount namespace of its own pivoted into the jail, an empty network
//! namespace for a backend that needs no network (blk), no device nodes,
//! the backend uid/gid with no capabilities, PR_SET_PDEATHSIG(SIGTERM),
//! and exactly the received fds at 3, 4, ... (every other fd is closed at
//! exec).
//!
//! The child reports a failure before exec through a close-on-exec pipe,
//! so the VMM gets the reason in [`LaunchResponse::Failed`]; an empty pipe
//! at EOF means the exec happened.
//!
//! [`LaunchResponse::Failed`]: jailer::launch::LaunchResponse::Failed

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jailer::launch::{BackendKind, LaunchRequest};
use nix::fcntl::{fcntl, FcntlArg};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{signal, SigHandler, SigSet};
use nix::sys::wait::waitpid;
use nix::unistd::{dup2, execve, fork, getppid, pipe2, ForkResult, Pid};

use super::LauncherConfig;
use crate::cgroup::CgroupSet;
use crate::chroot;
use crate::privileges;

/// The fd the backend finds its listening socket at; its stats page
/// follows, then the disk, the vsock host socket or the TAP queues.
pub const FIRST_FD: RawFd = 3;
/// Where fds are parked while they are moved into place.
const PARK_FDS_AT: RawFd = 64;

/// A started backend.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub cgroups: CgroupSet,
    /// Its jail's instance directory, for [`remove_jail`].
    pub instance: PathBuf,
}

/// The backend's command line (argv[0] is its path inside the jail).
pub fn backend_args(exe_name: &str, request: &LaunchRequest, fd_count: usize) -> Vec<String> {
    let mut args = vec![
        format!("/{exe_name}"),
        "--fd".to_string(),
        FIRST_FD.to_string(),
        "--stats-fd".to_string(),
        (FIRST_FD + 1).to_string(),
    ];
    let extra = match request.kind {
        BackendKind::Blk => "--disk-fd",
        BackendKind::Net => "--tap-fd",
        BackendKind::Vsock => "--uds-fd",
    };
    for i in 2..fd_count {
        args.push(extra.to_string());
        args.push((FIRST_FD + i as RawFd).to_string());
    }
    if let Some(name) = request.uds_path.as_deref().and_then(vsock_socket_name) {
        args.push("--uds-path".to_string());
        args.push(Path::new(VSOCK_DIR).join(name).display().to_string());
    }
    args.extend(request.args.iter().cloned());
    args
}

/// Where a vsock backend's jail holds the host socket's directory of the
/// VMM's jail: guest connections to `<uds_path>_<port>` are made there.
pub const VSOCK_DIR: &str = "/vsock";

/// The file name of a vsock device's host socket.
fn vsock_socket_name(uds_path: &str) -> Option<&std::ffi::OsStr> {
    Path::new(uds_path).file_name()
}

/// Grafts the directory of the vsock host socket `uds_path` (a path in
/// the VMM's jail, whose root is `vmm_root`) at [`VSOCK_DIR`] in `jail`.
/// The directory is opened beneath the VMM's root without following any
/// link (the jailed VMM owns what is in it), cloned as a mount tree and
/// moved into place: no path is looked up twice.
fn graft_vsock_dir(vmm_root: &Path, uds_path: &str, jail: &Path) -> Result<(), String> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
    let dir = Path::new(uds_path)
        .parent()
        .map(|p| p.strip_prefix("/").unwrap_or(p))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = fs::File::open(vmm_root)
        .map_err(|e| format!("cannot open the VMM's jail {}: {e}", vmm_root.display()))?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let socket_dir = openat2(root.as_raw_fd(), dir, how).map_err(|e| {
        format!(
            "the vsock socket's directory {} in the VMM's jail: {e}",
            dir.display()
        )
    })?;
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let socket_dir = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket_dir) };
    let tree = open_tree(
        &socket_dir,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| format!("cannot clone the vsock socket's directory: {e}"))?;
    let target = jail.join(VSOCK_DIR.trim_start_matches('/'));
    fs::create_dir_all(&target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        &target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| {
        format!(
            "cannot mount the vsock socket's directory at {}: {e}",
            target.display()
        )
    })
}

/// The directory of one backend's jail: `<backend-exe>/<device>` in the
/// VM's instance directory `<base>/<vmm-exe>/<id>`, beside the VMM's own
/// `root` (ids cannot hold '/', so no two instances' devices meet).
pub fn instance_dir(vm_dir: &Path, exe_name: &str, device_id: &str) -> PathBuf {
    vm_dir.join(exe_name).join(device_id)
}

/// The jail root in an instance directory.
pub fn jail_dir(instance: &Path) -> PathBuf {
    instance.join("root")
}

/// Removes a backend's jail (its instance directory) and the
/// `<backend-exe>` directory above it once that is empty.
pub fn remove_jail(instance: &Path) -> Result<(), String> {
    match fs::remove_dir_all(instance) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot remove the jail {}: {e}",
                instance.display()
            ))
        }
    }
    if let Some(exe_dir) = instance.parent() {
        // Not empty while another device of the kind has its jail.
        let _ = fs::remove_dir(exe_dir);
    }
    Ok(())
}

/// Creates the jail root in `instance` with a copy of `bin` and its
/// libraries (root-owned, read-only for the backend).
fn build_jail(bin: &Path, exe_name: &str, instance: &Path) -> Result<PathBuf, String> {
    let jail = jail_dir(instance);
    fs::create_dir_all(&jail).map_err(|e| format!("cannot create {}: {e}", jail.display()))?;
    let target = jail.join(exe_name);
    match fs::remove_file(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot replace {}: {e}", target.display())),
    }
    fs::copy(bin, &target)
        .map_err(|e| format!("cannot copy {} to {}: {e}", bin.display(), target.display()))?;
    crate::libs::copy_into(bin, &jail).map_err(|e| e.to_string())?;
    Ok(jail)
}

/// Starts the backend for `request` (validated) with `fds` (the socket
/// first). On failure nothing of it is left: no jail, no cgroup.
pub fn spawn(
    cfg: &LauncherConfig,
    request: &LaunchRequest,
    fds: Vec<OwnedFd>,
) -> Result<Spawned, String> {
    let bin = match request.kind {
        BackendKind::Blk => &cfg.blk_bin,
        BackendKind::Net => &cfg.net_bin,
        BackendKind::Vsock => &cfg.vsock_bin,
    };
    if !bin.is_file() {
        return Err(format!(
            "the backend binary {} does not exist",
            bin.display()
        ));
    }
    let exe_name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("the backend binary {} has no usable name", bin.display()))?;
    let instance = instance_dir(&cfg.vm_dir, exe_name, &request.device_id);
    let started = build_jail(bin, exe_name, &instance)
        .and_then(|jail| spawn_in(cfg, request, fds, exe_name, &jail));
    match started {
        Ok((pid, cgroups)) => Ok(Spawned {
            pid,
            cgroups,
            instance,
        }),
        Err(err) => {
            if let Err(cleanup) = remove_jail(&instance) {
                super::log(format_args!("{cleanup}"));
            }
            Err(err)
        }
    }
}

/// Forks the backend into `jail` (built) and its cgroups.
fn spawn_in(
    cfg: &LauncherConfig,
    request: &LaunchRequest,
    fds: Vec<OwnedFd>,
    exe_name: &str,
    jail: &Path,
) -> Result<(Pid, CgroupSet), String> {
    let args = backend_args(exe_name, request, fds.len());
    let c_args = args
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| format!("NUL in argument {a:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let c_path = CString::new(Path::new("/").join(exe_name).as_os_str().as_bytes())
        .map_err(|_| "NUL in the backend's name".to_string())?;

    let mut cgroups = cfg
        .cgroups
        .nested(&cfg.id)
        .create(&request.device_id)
        .map_err(|e| e.to_string())?;
    let (err_read, err_write) = match pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(pipe) => pipe,
        Err(e) => {
            cgroups.remove(Duration::ZERO);
            return Err(format!("cannot create a pipe: {e}"));
        }
    };
    let launcher = nix::unistd::getpid();
    // SAFETY: the launcher is single-threaded, so the child may run any
    // code until it execs or exits.
    match unsafe { fork() } {
        Err(e) => {
            cgroups.remove(Duration::ZERO);
            Err(format!("cannot fork: {e}"))
        }
        Ok(ForkResult::Child) => {
            drop(err_read);
            let target = ChildTarget {
                kind: request.kind,
                uds_path: request.uds_path.as_deref(),
                jail,
                path: &c_path,
                args: &c_args,
            };
            let Err(err) = child(cfg, &target, &fds, &cgroups, launcher, err_write);
            // Nothing to do on failure but exit.
            // SAFETY: _exit ends the child without unwinding into the
            // launcher's state.
            unsafe { libc::_exit(err) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(err_write);
            let mut message = String::new();
            let _ = fs::File::from(err_read).read_to_string(&mut message);
            if message.is_empty() {
                Ok((child, cgroups))
            } else {
                let _ = waitpid(child, None);
                cgroups.remove(Duration::from_secs(1));
                Err(message)
            }
        }
    }
}

/// What the child execs, and where.
struct ChildTarget<'a> {
    kind: BackendKind,
    /// A vsock backend's host socket, in the VMM's jail.
    uds_path: Option<&'a str>,
    jail: &'a Path,
    path: &'a CString,
    args: &'a [CString],
}

/// The child's side; writes why it failed to `report` and returns the exit
/// status to use.
fn child(
    cfg: &LauncherConfig,
    target: &ChildTarget<'_>,
    fds: &[OwnedFd],
    cgroups: &CgroupSet,
    launcher: Pid,
    report: OwnedFd,
) -> Result<Infallible, i32> {
    // Park the report pipe above the fds' final places.
    let parked_report = match fcntl(report.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(PARK_FDS_AT)) {
        Ok(fd) => fd,
        Err(_) => return Err(126),
    };
    drop(report);
    let report = parked_report;
    let fail = |message: String| -> i32 {
        let _ = nix::unistd::write(
            // SAFETY: `report` is open for the whole life of the child.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(report) },
            message.as_bytes(),
        );
        126
    };
    match setup(cfg, target, fds, cgroups, launcher, report) {
        Ok(()) => {}
        Err(message) => return Err(fail(message)),
    }
    let env: [CString; 0] = [];
    let Err(errno) = execve(target.path, target.args, &env);
    Err(fail(format!(
        "cannot exec {}: {errno}",
        target.path.to_string_lossy()
    )))
}

/// The namespaces a backend of `kind` gets: a mount namespace, and an
/// empty network namespace (only `lo`) for one that needs no network.
pub fn backend_namespaces(kind: BackendKind) -> CloneFlags {
    match kind {
        BackendKind::Blk => CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET,
        BackendKind::Net => CloneFlags::CLONE_NEWNS,
        BackendKind::Vsock => CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET,
    }
}

fn setup(
    cfg: &LauncherConfig,
    target: &ChildTarget<'_>,
    fds: &[OwnedFd],
    cgroups: &CgroupSet,
    launcher: Pid,
    report: RawFd,
) -> Result<(), String> {
    // The launcher's signal mask and ignored signals would survive exec.
    SigSet::empty()
        .thread_set_mask()
        .map_err(|e| format!("cannot reset the signal mask: {e}"))?;
    for sig in super::IGNORED_SIGNALS {
        // SAFETY: restoring the default disposition installs no handler.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) } != 0 {
        return Err(format!(
            "cannot set the parent-death signal: {}",
            std::io::Error::last_os_error()
        ));
    }
    if getppid() != launcher {
        return Err("the launcher exited".into());
    }
    cgroups.attach_self().map_err(|e| e.to_string())?;
    let namespaces = backend_namespaces(target.kind);
    unshare(namespaces)
        .map_err(|e| format!("cannot unshare the namespaces {namespaces:?}: {e}"))?;
    if let Some(uds_path) = target.uds_path {
        // Nothing mounted here may reach the launcher's namespace.
        chroot::stop_propagation().map_err(|e| format!("cannot make the mounts private: {e}"))?;
        graft_vsock_dir(&jail_dir(&cfg.vm_dir), uds_path, target.jail)?;
    }
    chroot::pivot_into(target.jail).map_err(|e| e.to_string())?;

    // Move the fds to 3, 4, ...: park them all high first so that no
    // dup2 lands on one not yet moved.
    let mut parked = Vec::with_capacity(fds.len());
    for fd in fds {
        let high = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(PARK_FDS_AT + 1))
            .map_err(|e| format!("cannot move fd {}: {e}", fd.as_raw_fd()))?;
        parked.push(high);
    }
    for (i, high) in parked.iter().enumerate() {
        let target = FIRST_FD + i as RawFd;
        // dup2 leaves the new fd without FD_CLOEXEC: it survives exec.
        dup2(*high, target).map_err(|e| format!("cannot move fd {high} to {target}: {e}"))?;
    }
    // Everything above is closed at exec (the report pipe included).
    let first_closed = FIRST_FD as libc::c_uint + parked.len() as libc::c_uint;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds.
    if unsafe {
        libc::close_range(
            first_closed,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    } != 0
    {
        return Err(format!(
            "cannot mark fds close-on-exec: {}",
            std::io::Error::last_os_error()
        ));
    }
    debug_assert!(report >= PARK_FDS_AT);
    cfg.limits.install().map_err(|e| e.to_string())?;
    privileges::drop_to(cfg.uid, cfg.gid, cfg.last_cap).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let mut request = LaunchRequest {
            kind: BackendKind::Blk,
            device_id: "root".into(),
            args: vec!["--readonly".into()],
            tap: None,
            tap_queue_pairs: 0,
            uds_path: None,
        };
        assert_eq!(
            backend_args("vhost-user-blk", &request, 3),
            [
                "/vhost-user-blk",
                "--fd",
                "3",
                "--stats-fd",
                "4",
                "--disk-fd",
                "5",
                "--readonly"
            ]
        );
        request.kind = BackendKind::Net;
        request.args = vec!["--queues".into(), "4".into()];
        assert_eq!(
            backend_args("vhost-user-net", &request, 4),
            [
                "/vhost-user-net",
                "--fd",
                "3",
                "--stats-fd",
                "4",
                "--tap-fd",
                "5",
                "--tap-fd",
                "6",
                "--queues",
                "4"
            ]
        );
        let instance = instance_dir(
            Path::new("/srv/jailer/tessera/vm"),
            "vhost-user-net",
            "eth0",
        );
        assert_eq!(
            jail_dir(&instance),
            PathBuf::from("/srv/jailer/tessera/vm/vhost-user-net/eth0/root")
        );
    }
}
