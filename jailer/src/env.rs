//! The jailer's steps, in Firecracker's order:
//!
//! 1. validate the id, the exec file, the chroot base, uid/gid, cgroups and
//!    limits ([`Env::new`]; nothing is created before all of them pass);
//! 2. (done by `main` before parsing) close inherited fds above 2 and
//!    clear the environment;
//! 3. create `<base>/<exe-name>/<id>/root` and copy the binary in; an
//!    existing `root/<exe-name>` means the id is taken and is refused;
//! 4. apply the resource limits;
//! 5. create the cgroups, write the values and join them;
//! 6. join `--netns`; for a `tessera*` exec file, fork the backend launcher
//!    (see [`crate::launcher`]) here, still root and before the jail's
//!    mount namespace (the launcher then makes a read-only one of its own);
//! 7. unshare the mount namespace (and the pid namespace with
//!    `--new-pid-ns`, forking so that the child is the namespace's pid 1),
//!    then pivot into the jail;
//! 8. make the jail's `/`, `/dev` and `/dev/net` root's (mode 0755: the
//!    jailed binary cannot remove or replace anything in its jail) and
//!    `/run` uid:gid's (mode 0700, for its sockets); create `/dev/kvm`,
//!    `/dev/net/tun`, `/dev/urandom` (and `/dev/userfaultfd` when the host
//!    has it) owned by uid:gid;
//! 9. with `--daemonize`, `setsid` (forking first if it must) and point stdio at
//!    /dev/null; drop to gid and uid with no capabilities, and exec the
//!    binary with `--id`, `--start-time-us`, `--start-time-cpu-us`,
//!    `--parent-cpu-time-us` (and `--backend-launcher-fd`) before the
//!    user's arguments.
//!
//! A failure after step 5 moves the process back out of its cgroups and
//! removes them before the jailer exits.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{dup2, execve, fork, setsid, ForkResult};

use crate::cgroup::{self, CgroupError, CgroupPlan, CgroupSet, CgroupVersion};
use crate::chroot::{self, ChrootError};
use crate::cli::Cli;
use crate::launcher::{self, LauncherConfig, LauncherError};
use crate::privileges::{self, PrivilegeError};
use crate::resource_limits::{ResourceLimitError, ResourceLimits};
use jailer::id::{self, IdError};

/// Exec files whose name starts with this get the backend launcher.
pub const TESSERA_PREFIX: &str = "tessera";

/// Errors of the jailer's steps.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("invalid uid {0:?}: expected a number from 0 to 4294967295")]
    Uid(String),
    #[error("invalid gid {0:?}: expected a number from 0 to 4294967295")]
    Gid(String),
    #[error("invalid --backend-uid {0:?}: expected a number from 0 to 4294967295")]
    BackendUid(String),
    #[error("invalid --backend-gid {0:?}: expected a number from 0 to 4294967295")]
    BackendGid(String),
    #[error("invalid exec file {path}: {source}")]
    ExecFile {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid exec file {0}: not a regular file")]
    ExecNotAFile(String),
    #[error("invalid exec file {0}: its name is not valid UTF-8")]
    ExecName(String),
    #[error("invalid backend binary {path}: {reason}")]
    BackendBin { path: String, reason: String },
    #[error("invalid chroot base dir {path}: {source}")]
    ChrootBase {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid chroot base dir {0}: not a directory")]
    ChrootBaseNotADir(String),
    #[error("the jail {0} already exists: the id is in use (remove the jail to reuse it)")]
    JailExists(String),
    #[error("cannot create the jail {path}: {source}")]
    CreateJail {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: String,
        to: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Libs(#[from] crate::libs::LibsError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    ResourceLimit(#[from] ResourceLimitError),
    #[error("cannot open the network namespace {path}: {source}")]
    NetnsOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot join the network namespace {path}: {errno}")]
    NetnsJoin { path: String, errno: nix::Error },
    #[error(transparent)]
    Launcher(#[from] LauncherError),
    #[error("cannot unshare the {what} namespace: {errno}")]
    Unshare {
        what: &'static str,
        errno: nix::Error,
    },
    #[error("cannot fork: {0}")]
    Fork(nix::Error),
    #[error("cannot write the pid file {path}: {source}")]
    PidFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    #[error("cannot open /dev/null: {0}")]
    DevNull(std::io::Error),
    #[error("cannot daemonize: {what}: {errno}")]
    Daemonize {
        what: &'static str,
        errno: nix::Error,
    },
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error("an argument contains a NUL byte: {0:?}")]
    Nul(String),
    #[error("cannot exec {path}: {errno}")]
    Exec { path: String, errno: nix::Error },
}

fn parse_id_number(value: &str) -> Option<u32> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// The binaries and ids of the sibling backends (for `tessera*`).
#[derive(Debug, Clone)]
pub struct Backends {
    pub uid: u32,
    pub gid: u32,
    pub blk_bin: PathBuf,
    pub net_bin: PathBuf,
    pub vsock_bin: PathBuf,
}

/// Everything the jailer will do, validated.
#[derive(Debug)]
pub struct Env {
    pub id: String,
    pub exec_file: PathBuf,
    pub exec_name: String,
    pub chroot_base: PathBuf,
    /// `<base>/<exe-name>/<id>/root`.
    pub chroot_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroups: CgroupPlan,
    pub limits: ResourceLimits,
    pub exec_args: Vec<String>,
    pub backends: Option<Backends>,
    /// CLOCK_MONOTONIC at start, µs (Firecracker's `--start-time-us`).
    pub start_time_us: u64,
    /// The jailer's CPU time at start, µs.
    pub start_time_cpu_us: u64,
    proc_misc: String,
    last_cap: u32,
}

/// A clock's value in microseconds.
pub fn clock_us(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// Resolves a backend binary: the flag's path (which must be a file) or
/// `name` next to the exec file (which may be missing: the launcher then
/// refuses that kind).
fn backend_bin(flag: Option<&Path>, exec_file: &Path, name: &str) -> Result<PathBuf, EnvError> {
    match flag {
        Some(path) => {
            let canonical = fs::canonicalize(path).map_err(|err| EnvError::BackendBin {
                path: path.display().to_string(),
                reason: err.to_string(),
            })?;
            if !canonical.is_file() {
                return Err(EnvError::BackendBin {
                    path: path.display().to_string(),
                    reason: "not a regular file".into(),
                });
            }
            Ok(canonical)
        }
        None => Ok(exec_file.with_file_name(name)),
    }
}

impl Env {
    /// Step 1: validates the command line; creates nothing.
    pub fn new(cli: Cli, start_time_us: u64, start_time_cpu_us: u64) -> Result<Self, EnvError> {
        id::validate(&cli.id)?;
        let exec_file = fs::canonicalize(&cli.exec_file).map_err(|source| EnvError::ExecFile {
            path: cli.exec_file.display().to_string(),
            source,
        })?;
        if !exec_file.is_file() {
            return Err(EnvError::ExecNotAFile(exec_file.display().to_string()));
        }
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| EnvError::ExecName(exec_file.display().to_string()))?
            .to_string();
        let chroot_base =
            fs::canonicalize(&cli.chroot_base_dir).map_err(|source| EnvError::ChrootBase {
                path: cli.chroot_base_dir.display().to_string(),
                source,
            })?;
        if !chroot_base.is_dir() {
            return Err(EnvError::ChrootBaseNotADir(
                chroot_base.display().to_string(),
            ));
        }
        let chroot_dir = chroot_base.join(&exec_name).join(&cli.id).join("root");
        let uid = parse_id_number(&cli.uid).ok_or_else(|| EnvError::Uid(cli.uid.clone()))?;
        let gid = parse_id_number(&cli.gid).ok_or_else(|| EnvError::Gid(cli.gid.clone()))?;
        let version = CgroupVersion::parse(&cli.cgroup_version)?;
        let parent = cgroup::parse_parent(cli.parent_cgroup.as_deref().unwrap_or(&exec_name))?;
        let cgroups = CgroupPlan::new(version, parent, &cli.cgroup)?;
        let limits = ResourceLimits::parse(&cli.resource_limit)?;
        let backends = if exec_name.starts_with(TESSERA_PREFIX) {
            let backend_uid = match &cli.backend_uid {
                Some(v) => parse_id_number(v).ok_or_else(|| EnvError::BackendUid(v.clone()))?,
                None => uid,
            };
            let backend_gid = match &cli.backend_gid {
                Some(v) => parse_id_number(v).ok_or_else(|| EnvError::BackendGid(v.clone()))?,
                None => gid,
            };
            Some(Backends {
                uid: backend_uid,
                gid: backend_gid,
                blk_bin: backend_bin(
                    cli.vhost_user_blk_bin.as_deref(),
                    &exec_file,
                    "vhost-user-blk",
                )?,
                net_bin: backend_bin(
                    cli.vhost_user_net_bin.as_deref(),
                    &exec_file,
                    "vhost-user-net",
                )?,
                vsock_bin: backend_bin(
                    cli.vhost_user_vsock_bin.as_deref(),
                    &exec_file,
                    "vhost-user-vsock",
                )?,
            })
        } else {
            None
        };
        let mut exec_args = Vec::new();
        for arg in &cli.exec_args {
            if arg.contains('\0') {
                return Err(EnvError::Nul(arg.clone()));
            }
            exec_args.push(arg.clone());
        }
        Ok(Self {
            id: cli.id,
            exec_file,
            exec_name,
            chroot_base,
            chroot_dir,
            uid,
            gid,
            netns: cli.netns,
            daemonize: cli.daemonize,
            new_pid_ns: cli.new_pid_ns,
            cgroups,
            limits,
            exec_args,
            backends,
            start_time_us,
            start_time_cpu_us,
            proc_misc: fs::read_to_string("/proc/misc").unwrap_or_default(),
            last_cap: privileges::prepare(),
        })
    }

    /// Steps 3 to 9; returns only on failure.
    pub fn run(self) -> Result<Infallible, EnvError> {
        // 3. The jail and the binary in it, root's and not writable by
        // anyone else whatever the caller's umask.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let jailed_exec = self.chroot_dir.join(&self.exec_name);
        if fs::symlink_metadata(&jailed_exec).is_ok() {
            return Err(EnvError::JailExists(self.chroot_dir.display().to_string()));
        }
        fs::create_dir_all(&self.chroot_dir).map_err(|source| EnvError::CreateJail {
            path: self.chroot_dir.display().to_string(),
            source,
        })?;
        // A copy, not a hard link, as Firecracker: jailed VMMs share no
        // page cache for their code.
        let copy_err = |source| EnvError::Copy {
            from: self.exec_file.display().to_string(),
            to: jailed_exec.display().to_string(),
            source,
        };
        fs::copy(&self.exec_file, &jailed_exec).map_err(copy_err)?;
        fs::set_permissions(&jailed_exec, fs::Permissions::from_mode(0o755)).map_err(copy_err)?;
        crate::libs::copy_into(&self.exec_file, &self.chroot_dir)?;

        // A failure from here on removes the copy again (through a
        // directory fd, which still works after the pivot), so that the id
        // is not left taken by a jail that never ran.
        let jail_fd = nix::fcntl::open(
            &self.chroot_dir,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
        // SAFETY: `open` just returned this fd and nothing else owns it.
        .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        let Err(err) = self.run_copied();
        if let Some(fd) = jail_fd {
            let _ = nix::unistd::unlinkat(
                Some(fd.as_raw_fd()),
                self.exec_name.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        Err(err)
    }

    fn run_copied(&self) -> Result<Infallible, EnvError> {
        // 4. Resource limits.
        self.limits.install()?;

        // 5. Cgroups; from here on a failure removes them.
        let mut cgroups = self.cgroups.create(&self.id)?;
        let Err(err) = self.run_in_cgroups(&mut cgroups);
        cgroups.leave_self();
        for (path, errno) in cgroups.remove(Duration::from_secs(1)) {
            eprintln!("jailer: cannot remove cgroup {}: {errno}", path.display());
        }
        Err(err)
    }

    fn run_in_cgroups(&self, cgroups: &mut CgroupSet) -> Result<Infallible, EnvError> {
        cgroups.attach_self()?;

        // 6. The network namespace, then the launcher (still root, before
        // the jail's mount namespace).
        self.join_netns()?;
        let dev_null = if self.daemonize {
            Some(
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(EnvError::DevNull)?,
            )
        } else {
            None
        };
        let launcher_fd = self.start_launcher(cgroups)?;

        // 7. Mount (and pid) namespace, then into the jail.
        let mut write_pid = self.enter_jail()?;

        // 8. Directories and device nodes.
        self.populate_jail()?;

        // 9. Daemonize, drop privileges, exec.
        if let Some(null) = dev_null {
            self.daemonize(&null)?;
        }
        if !self.new_pid_ns {
            // After daemonizing, which may have forked.
            write_pid(std::process::id() as i32)?;
        }
        self.exec(launcher_fd.as_ref())
    }

    /// Joins `--netns`, if given.
    fn join_netns(&self) -> Result<(), EnvError> {
        let Some(path) = &self.netns else {
            return Ok(());
        };
        let file = fs::File::open(path).map_err(|source| EnvError::NetnsOpen {
            path: path.display().to_string(),
            source,
        })?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| EnvError::NetnsJoin {
            path: path.display().to_string(),
            errno,
        })
    }

    /// With `--backend-uid` and friends: forks the backend launcher; its
    /// end of the channel is for the VMM.
    fn start_launcher(&self, cgroups: &mut CgroupSet) -> Result<Option<OwnedFd>, EnvError> {
        let Some(backends) = &self.backends else {
            return Ok(None);
        };
        let config = LauncherConfig {
            id: self.id.clone(),
            vm_dir: self.chroot_base.join(&self.exec_name).join(&self.id),
            uid: backends.uid,
            gid: backends.gid,
            blk_bin: backends.blk_bin.clone(),
            net_bin: backends.net_bin.clone(),
            vsock_bin: backends.vsock_bin.clone(),
            limits: self.limits.clone(),
            cgroups: self.cgroups.clone(),
            quiet: self.daemonize,
            last_cap: self.last_cap,
            taps: launcher::tap::TapPolicy {
                uid: self.uid,
                gid: self.gid,
                private_netns: self.netns.is_some(),
            },
            max_starts: jailer::launch::MAX_BACKEND_STARTS,
        };
        Ok(Some(launcher::start(config, cgroups)?.0))
    }

    /// Unshares the mount (and pid) namespace and pivots into the jail;
    /// with a new pid namespace, the jailer forks and the parent writes
    /// the child's pid and exits. Returns what writes the pid file.
    fn enter_jail(&self) -> Result<impl FnMut(i32) -> Result<(), EnvError>, EnvError> {
        let mut flags = CloneFlags::CLONE_NEWNS;
        if self.new_pid_ns {
            flags |= CloneFlags::CLONE_NEWPID;
        }
        unshare(flags).map_err(|errno| EnvError::Unshare {
            what: if self.new_pid_ns {
                "mount and pid"
            } else {
                "mount"
            },
            errno,
        })?;
        let pid_file = self.chroot_dir.join(format!("{}.pid", self.exec_name));
        let shown = pid_file.display().to_string();
        let pid_err = move |source| EnvError::PidFile {
            path: shown.clone(),
            source,
        };
        // Opened before the fork: the child's pivot_root moves the root of
        // every process in this mount namespace, the parent's included.
        let mut pid_out = fs::File::create(&pid_file).map_err(&pid_err)?;
        let mut write_pid = move |pid: i32| {
            std::io::Write::write_all(&mut pid_out, pid.to_string().as_bytes()).map_err(&pid_err)
        };
        if self.new_pid_ns {
            // SAFETY: the jailer is single-threaded, so the child may
            // continue with any code.
            match unsafe { fork() }.map_err(EnvError::Fork)? {
                ForkResult::Parent { child } => {
                    if let Err(err) = write_pid(child.as_raw()) {
                        eprintln!("jailer: {err}");
                        std::process::exit(1);
                    }
                    std::process::exit(0);
                }
                ForkResult::Child => {}
            }
        }
        chroot::pivot_into(&self.chroot_dir)?;
        Ok(write_pid)
    }

    /// The jail's directories and device nodes: the jail is root's, but for
    /// the nodes and /run (its sockets), as with Firecracker.
    fn populate_jail(&self) -> Result<(), EnvError> {
        for dir in ["/", "/dev", "/dev/net"] {
            chroot::root_dir(Path::new(dir))?;
        }
        chroot::own_dir(Path::new("/run"), self.uid, self.gid)?;
        for node in chroot::vmm_devices(&self.proc_misc) {
            let optional =
                node.path != Path::new("/dev/kvm") && node.path != Path::new("/dev/net/tun");
            match chroot::make_device(&node, self.uid, self.gid) {
                Ok(()) => {}
                Err(err) if optional => eprintln!("jailer: warning: {err}"),
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// Drops to `--uid`/`--gid` and execs the jailed binary with the
    /// jailer's timing flags, the launcher's channel and `exec_args`.
    fn exec(&self, launcher_fd: Option<&OwnedFd>) -> Result<Infallible, EnvError> {
        let mut args: Vec<String> = vec![
            format!("/{}", self.exec_name),
            "--id".into(),
            self.id.clone(),
            "--start-time-us".into(),
            self.start_time_us.to_string(),
            // As Firecracker: the CPU clock restarts at exec, and the
            // jailer's own CPU time is passed as the parent's.
            "--start-time-cpu-us".into(),
            "0".into(),
            "--parent-cpu-time-us".into(),
            clock_us(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
                .saturating_sub(self.start_time_cpu_us)
                .to_string(),
        ];
        if let Some(fd) = launcher_fd {
            args.push("--backend-launcher-fd".into());
            args.push(fd.as_raw_fd().to_string());
        }
        args.extend(self.exec_args.iter().cloned());
        let c_args = args
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| EnvError::Nul(a.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let path = CString::new(Path::new("/").join(&self.exec_name).as_os_str().as_bytes())
            .map_err(|_| EnvError::Nul(self.exec_name.clone()))?;

        privileges::drop_to(self.uid, self.gid, self.last_cap)?;
        let env: [CString; 0] = [];
        let Err(errno) = execve(&path, &c_args, &env);
        Err(EnvError::Exec {
            path: self.exec_file.display().to_string(),
            errno,
        })
    }

    /// Detaches from the caller's session with stdio on /dev/null. A
    /// process group leader cannot `setsid`, so it forks once and the
    /// child goes on; pid 1 of a new pid namespace is never a leader (and
    /// must not fork away: its exit would end the namespace).
    fn daemonize(&self, null: &fs::File) -> Result<(), EnvError> {
        if setsid().is_err() {
            // SAFETY: single-threaded; the parent only exits.
            match unsafe { fork() }.map_err(|errno| EnvError::Daemonize {
                what: "fork",
                errno,
            })? {
                ForkResult::Parent { .. } => std::process::exit(0),
                ForkResult::Child => {}
            }
            setsid().map_err(|errno| EnvError::Daemonize {
                what: "setsid",
                errno,
            })?;
        }
        for fd in 0..=2 {
            dup2(null.as_raw_fd(), fd).map_err(|errno| EnvError::Daemonize {
                what: "dup2 /dev/null",
                errno,
            })?;
        }
        Ok(())
    }
}

/// Step 2: closes every inherited fd above 2 and clears the environment.
pub fn sanitize_process() {
    let fds: Vec<i32> = match fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .filter(|fd| *fd > 2)
            .collect(),
        Err(_) => Vec::new(),
    };
    for fd in fds {
        // The read_dir fd itself is already closed; EBADF is harmless.
        let _ = nix::unistd::close(fd);
    }
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cli(extra: &[&str]) -> Cli {
        let base = [
            "jailer",
            "--id",
            "vm-1",
            "--exec-file",
            "/bin/true",
            "--uid",
            "1234",
            "--gid",
            "1235",
            "--chroot-base-dir",
            "/tmp",
        ];
        Cli::try_parse_from(base.iter().chain(extra.iter())).unwrap()
    }

    fn err(extra: &[&str]) -> String {
        Env::new(cli(extra), 0, 0).unwrap_err().to_string()
    }

    /// The error for a whole command line (after `jailer`).
    fn err_from(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(std::iter::once(&"jailer").chain(args)).unwrap();
        Env::new(cli, 0, 0).unwrap_err().to_string()
    }

    #[test]
    fn valid_command_line() {
        let env = Env::new(cli(&["--", "--flag"]), 5, 6).unwrap();
        let exe = fs::canonicalize("/bin/true").unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(
            env.chroot_dir,
            PathBuf::from(format!("/tmp/{name}/vm-1/root"))
        );
        assert_eq!((env.uid, env.gid), (1234, 1235));
        assert_eq!(env.exec_args, ["--flag"]);
        assert!(
            env.backends.is_none(),
            "no launcher for a non-tessera binary"
        );
        assert_eq!(env.cgroups.parent, PathBuf::from(&name));
        assert!(env.cgroups.hierarchies.is_empty());
        assert_eq!(env.limits.no_file, 2048);
    }

    #[test]
    fn each_bad_value_is_named() {
        let long = "a".repeat(65);
        let e = err_from(&[
            "--id",
            &long,
            "--exec-file",
            "/bin/true",
            "--uid",
            "1",
            "--gid",
            "1",
        ]);
        assert!(e.contains(&long) && e.contains("64"), "{e}");
        let e = err_from(&[
            "--id",
            "x",
            "--exec-file",
            "/bin/true",
            "--uid",
            "abc",
            "--gid",
            "1",
            "--chroot-base-dir",
            "/tmp",
        ]);
        assert!(e.contains("invalid uid \"abc\""), "{e}");
        let e = err_from(&[
            "--id",
            "x",
            "--exec-file",
            "/bin/true",
            "--uid",
            "1",
            "--gid",
            "-1",
            "--chroot-base-dir",
            "/tmp",
        ]);
        assert!(e.contains("invalid gid \"-1\""), "{e}");
        let e = err_from(&[
            "--id",
            "x",
            "--exec-file",
            "/nonexistent/tessera",
            "--uid",
            "1",
            "--gid",
            "1",
        ]);
        assert!(
            e.contains("/nonexistent/tessera") && e.contains("No such file"),
            "{e}"
        );
        let e = err_from(&[
            "--id",
            "x",
            "--exec-file",
            "/tmp",
            "--uid",
            "1",
            "--gid",
            "1",
        ]);
        assert!(e.contains("not a regular file"), "{e}");
        let e = err_from(&[
            "--id",
            "x",
            "--exec-file",
            "/bin/true",
            "--uid",
            "1",
            "--gid",
            "1",
            "--chroot-base-dir",
            "/nonexistent-base",
        ]);
        assert!(e.contains("/nonexistent-base"), "{e}");
        assert!(err(&["--cgroup-version", "3"]).contains("\"3\""));
        assert!(err(&["--cgroup", "cpusetcpus=1"]).contains("cpusetcpus"));
        assert!(err(&["--cgroup", "nosuchctl.x=1"]).contains("nosuchctl"));
        assert!(err(&["--parent-cgroup", "../up"]).contains("../up"));
        assert!(err(&["--resource-limit", "no-file=x"]).contains("no-file=x"));
        assert!(err(&["--resource-limit", "stack=1"]).contains("stack=1"));
    }

    #[test]
    fn tessera_gets_backends() {
        let dir = std::env::temp_dir().join(format!("jailer-env-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("tessera");
        fs::write(&exe, b"").unwrap();
        let base = [
            "jailer",
            "--id",
            "vm",
            "--exec-file",
            exe.to_str().unwrap(),
            "--uid",
            "10",
            "--gid",
            "11",
            "--chroot-base-dir",
            "/tmp",
        ];
        let env = Env::new(Cli::try_parse_from(base).unwrap(), 0, 0).unwrap();
        let backends = env.backends.unwrap();
        assert_eq!((backends.uid, backends.gid), (10, 11));
        assert_eq!(backends.blk_bin, dir.join("vhost-user-blk"));
        assert_eq!(backends.net_bin, dir.join("vhost-user-net"));
        assert_eq!(env.cgroups.parent, PathBuf::from("tessera"));
        let mut args = base.to_vec();
        args.extend(["--backend-uid", "20", "--backend-gid", "x"]);
        let e = Env::new(Cli::try_parse_from(&args).unwrap(), 0, 0).unwrap_err();
        assert!(e.to_string().contains("--backend-gid \"x\""), "{e}");
        let mut args = base.to_vec();
        args.extend(["--vhost-user-blk-bin", "/nonexistent/blk"]);
        let e = Env::new(Cli::try_parse_from(&args).unwrap(), 0, 0).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/blk"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
