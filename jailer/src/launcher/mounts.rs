//! The launcher's view of the host's files: a mount namespace of its own
//! whose root is a small read-only tmpfs holding only what it needs, each
//! at its host path: the VM's instance directory (`<base>/<vmm-exe>/<id>`,
//! where the backends' jails are built) and the cgroup hierarchies (where
//! their cgroups are made), writable; the backend binaries and the library
//! directories (copied into each jail), read-only and not executable; and
//! `/dev/net/tun` and `/dev/null`. A compromised launcher can neither
//! change nor read any other host file. Mount propagation is made slave
//! first, so nothing done here reaches the host; the backends' own
//! namespaces are copies of this one.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Errors confining the launcher's mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot unshare the launcher's mount namespace: {0}")]
    Unshare(nix::Error),
    #[error("cannot make the launcher's mounts slave: {0}")]
    Propagation(nix::Error),
    #[error("cannot bind-mount {path} for the launcher: {errno}")]
    Bind { path: String, errno: nix::Error },
    #[error("cannot make {path} read-only for the launcher: {errno}")]
    ReadOnly { path: String, errno: nix::Error },
    #[error("no directory to build the launcher's root in: each of {STAGING_CANDIDATES:?} is missing or on the way to a path it needs, and none can be made in the instance directory")]
    NoStaging,
    #[error("cannot mount the launcher's root at {path}: {errno}")]
    Tmpfs { path: String, errno: nix::Error },
    #[error("cannot enter the launcher's root: {0}")]
    Pivot(crate::chroot::ChrootError),
}

#[cfg(test)]
/// One line of `/proc/self/mountinfo` (tests read the launcher's): where, its per-mount options, the
/// file system type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub options: String,
    pub fstype: String,
}

#[cfg(test)]
/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let octal = bytes
            .get(at + 1..at + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match (bytes[at], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                at += 4;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (mine, theirs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mine.split(' ').collect();
            Some(Mount {
                point: PathBuf::from(unescape(fields.get(4)?)),
                options: fields.get(5)?.to_string(),
                fstype: theirs.split(' ').next()?.to_string(),
            })
        })
        .collect()
}

/// How the launcher may use a path of its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Written (the instance directory), with the mounts below it.
    Write,
    /// Read only, without exec, suid or devices (binaries, libraries).
    Read,
    /// A device node, opened but not executed (`/dev/net/tun`).
    Device,
    /// A symlink, made again in the view with the same target.
    Link,
    /// The cgroup hierarchies: each writable, the tmpfs that holds them
    /// (cgroup v1) read-only.
    Cgroups,
}

/// Directories one of which holds the launcher's new root while it is
/// built: a tmpfs is mounted there, in the launcher's own namespace only.
const STAGING_CANDIDATES: &[&str] = &["/mnt", "/media", "/srv", "/opt", "/run", "/var/tmp"];

/// What the launcher needs to reach, and how: the VM's instance directory
/// (`writable`) and the cgroup hierarchies to write, the backend binaries
/// (`binaries`) and the library directories to read, `/dev/net/tun` and
/// `/dev/null` to open.
pub fn reachable(writable: &Path, binaries: &[&Path]) -> Vec<(PathBuf, Access)> {
    let mut paths = vec![
        (writable.to_path_buf(), Access::Write),
        (PathBuf::from("/sys/fs/cgroup"), Access::Cgroups),
    ];
    paths.extend(binaries.iter().map(|b| (b.to_path_buf(), Access::Read)));
    paths.extend(
        crate::libs::LIBRARY_DIRS
            .iter()
            .map(|dir| (PathBuf::from(dir), Access::Read)),
    );
    paths.extend(
        ["/dev/net/tun", "/dev/null"]
            .iter()
            .map(|dev| (PathBuf::from(dev), Access::Device)),
    );
    // Library directories may be missing, or symlinks to others (/lib ->
    // usr/lib): what a path resolves to is bound, and a symlink is made
    // again in the view (the ELF interpreter is /lib64/...). Resolved
    // paths also keep a bind from ever following a link out of the view.
    let mut resolved = Vec::new();
    for (path, access) in paths {
        let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        if link {
            resolved.push((path.clone(), Access::Link));
        }
        match std::fs::canonicalize(&path) {
            Ok(real) => resolved.push((real, access)),
            Err(_) if matches!(access, Access::Write | Access::Cgroups) => {
                resolved.push((path, access))
            }
            Err(_) => {}
        }
    }
    // A path already reached read-only through another (a binary in a
    // library directory, the same binary twice) is not bound again: the
    // first bind is read-only, so nothing can be made inside it.
    let all = resolved.clone();
    let mut seen = std::collections::HashSet::new();
    resolved.retain(|(path, access)| {
        let covered = *access == Access::Read
            && all
                .iter()
                .any(|(other, a)| *a == Access::Read && other != path && path.starts_with(other));
        !covered && seen.insert(path.clone())
    });
    // Links last, once what they point into is there.
    resolved.sort_by_key(|(_, access)| *access == Access::Link);
    resolved
}

/// A directory to build the new root in that is not on the way to any
/// path it must hold (mounting there would hide it).
/// Without one (a minimal host has none of them), a directory made in the
/// instance directory (the first writable path), removed once the launcher
/// is in its view; that directory is bound without what is mounted below
/// it, so the view does not hold itself.
fn staging_dir(paths: &[(PathBuf, Access)]) -> Result<(PathBuf, bool), MountError> {
    let candidate = STAGING_CANDIDATES.iter().map(PathBuf::from).find(|dir| {
        dir.is_dir()
            && paths
                .iter()
                .all(|(path, _)| !path.starts_with(dir) && !dir.starts_with(path))
    });
    if let Some(dir) = candidate {
        return Ok((dir, false));
    }
    let (instance, _) = paths
        .iter()
        .find(|(_, access)| *access == Access::Write)
        .ok_or(MountError::NoStaging)?;
    let made = instance.join(".launcher-view");
    match std::fs::create_dir(&made) {
        Ok(()) => Ok((made, true)),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok((made, true)),
        Err(_) => Err(MountError::NoStaging),
    }
}

fn bind(source: &Path, target: &Path, access: Access) -> Result<(), MountError> {
    let bind_err = |errno| MountError::Bind {
        path: source.display().to_string(),
        errno,
    };
    let io_errno = |err: std::io::Error| nix::Error::from_raw(err.raw_os_error().unwrap_or(0));
    if access == Access::Link {
        if std::fs::symlink_metadata(target).is_ok() {
            return Ok(());
        }
        let to = std::fs::read_link(source).map_err(|err| bind_err(io_errno(err)))?;
        return target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::os::unix::fs::symlink(to, target))
            .map_err(|err| bind_err(io_errno(err)));
    }
    let create = if source.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::File::create(target).map(drop))
    };
    create.map_err(|err| bind_err(io_errno(err)))?;
    let recursive = match access {
        Access::Cgroups => MsFlags::MS_REC,
        Access::Write => MsFlags::empty(),
        Access::Read | Access::Device | Access::Link => MsFlags::empty(),
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | recursive,
        None::<&str>,
    )
    .map_err(bind_err)?;
    let read_only = match access {
        Access::Write | Access::Link => return Ok(()),
        Access::Cgroups => {
            let holder = nix::sys::statfs::statfs(target)
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
            if !holder {
                return Ok(());
            }
            MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
        }
        Access::Read => MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Access::Device => MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID,
    };
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | read_only,
        None::<&str>,
    )
    .map_err(|errno| MountError::ReadOnly {
        path: source.display().to_string(),
        errno,
    })
}

/// Moves the calling process into a mount namespace of its own whose root
/// is a read-only tmpfs holding only `paths`, each at its own path and
/// with its access; the rest of the host's tree is gone.
pub fn confine_mounts(paths: &[(PathBuf, Access)]) -> Result<(), MountError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(MountError::Unshare)?;
    crate::chroot::stop_propagation().map_err(MountError::Propagation)?;
    let (root, made) = staging_dir(paths)?;
    let tmpfs_err = |errno| MountError::Tmpfs {
        path: root.display().to_string(),
        errno,
    };
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=1m"),
    )
    .map_err(tmpfs_err)?;
    for (path, access) in paths {
        let inside = root.join(path.strip_prefix("/").unwrap_or(path));
        bind(path, &inside, *access)?;
    }
    crate::chroot::pivot_into(&root).map_err(MountError::Pivot)?;
    if made {
        // Seen through the instance directory's bind: an empty directory.
        let _ = std::fs::remove_dir(&root);
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(tmpfs_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/x
23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
30 22 0:27 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
31 22 0:28 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
40 22 8:1 /dir /srv/with\\040space ro,relatime - ext4 /dev/sda1 rw
";

    #[test]
    fn mountinfo_lines() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[1].point, PathBuf::from("/proc"));
        assert_eq!(mounts[1].options, "rw,nosuid,nodev,noexec,relatime");
        assert_eq!(mounts[2].fstype, "cgroup");
        assert_eq!(mounts[4].point, PathBuf::from("/srv/with space"));
    }

    #[test]
    fn the_view_holds_what_the_launcher_needs_and_is_built_away_from_it() {
        let vm_dir = Path::new("/srv/jailer/tessera/vm");
        let paths = reachable(vm_dir, &[Path::new("/proc/self/exe")]);
        assert_eq!(paths[0], (vm_dir.to_path_buf(), Access::Write));
        assert!(paths.contains(&(PathBuf::from("/sys/fs/cgroup"), Access::Cgroups)));
        assert!(paths.contains(&(PathBuf::from("/dev/null"), Access::Device)));
        assert!(paths
            .iter()
            .any(|(p, a)| p.starts_with("/usr/lib") && *a == Access::Read));
        // Not /srv: the instance directory is below it.
        let (staging, made) = staging_dir(&[(vm_dir.to_path_buf(), Access::Write)]).unwrap();
        assert!(
            !made && !vm_dir.starts_with(&staging),
            "{}",
            staging.display()
        );
    }
}
