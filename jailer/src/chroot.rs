//! Into the jail: a private mount namespace pivoted onto the jail root, as
//! Firecracker's jailer does it (`chroot()` alone can be escaped by a
//! process that keeps a directory fd or gains CAP_SYS_CHROOT), and the
//! device nodes the VMM needs inside it.
//!
//! The caller must already be in a mount namespace of its own
//! (`unshare(CLONE_NEWNS)`); [`pivot_into`] first turns mount propagation
//! to slave so that nothing done here reaches the host, bind-mounts the
//! jail root on itself (pivot_root needs a mount point), pivots, and
//! detaches the old root so no host path stays reachable.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, chown, pivot_root, Gid, Uid};

/// The old root's mount point inside the jail while pivoting.
const OLD_ROOT: &str = "old_root";

/// Errors entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error("cannot make the mounts slave (mount --make-rslave /): {0}")]
    Propagation(nix::Error),
    #[error("cannot bind-mount the jail root {path} on itself: {errno}")]
    BindMount { path: String, errno: nix::Error },
    #[error("cannot chdir to {path}: {errno}")]
    Chdir { path: String, errno: nix::Error },
    #[error("cannot create {path} in the jail: {source}")]
    Mkdir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot pivot_root into {path}: {errno}")]
    PivotRoot { path: String, errno: nix::Error },
    #[error("cannot unmount the old root: {0}")]
    Umount(nix::Error),
    #[error("cannot remove the old root directory: {0}")]
    RemoveOldRoot(std::io::Error),
    #[error("cannot create the device node {path} ({major}:{minor}) in the jail: {errno}")]
    Mknod {
        path: String,
        major: u64,
        minor: u64,
        errno: nix::Error,
    },
    #[error("cannot give {path} to {uid}:{gid}: {errno}")]
    Chown {
        path: String,
        uid: u32,
        gid: u32,
        errno: nix::Error,
    },
}

/// The step of [`private_view_of`] that failed.
pub enum ViewStep {
    Propagation(nix::Error),
    Bind(nix::Error),
}

/// In the caller's own mount namespace: makes `/` a recursive slave, so
/// that no mount made here reaches the host.
pub fn stop_propagation() -> nix::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
}

/// In the caller's own mount namespace: stops mount events propagating back
/// to the host (`/` becomes a recursive slave) and bind-mounts `dir` on
/// itself, so that it is a mount point of its own (for `pivot_root`, or to
/// be left writable under a read-only view).
pub fn private_view_of(dir: &Path) -> Result<(), ViewStep> {
    stop_propagation().map_err(ViewStep::Propagation)?;
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(ViewStep::Bind)
}

/// Pivots the calling process (already in its own mount namespace) into
/// `root`; afterwards `/` is `root` and the host's tree is gone.
pub fn pivot_into(root: &Path) -> Result<(), ChrootError> {
    private_view_of(root).map_err(|step| match step {
        ViewStep::Propagation(errno) => ChrootError::Propagation(errno),
        ViewStep::Bind(errno) => ChrootError::BindMount {
            path: root.display().to_string(),
            errno,
        },
    })?;
    chdir(root).map_err(|errno| ChrootError::Chdir {
        path: root.display().to_string(),
        errno,
    })?;
    match std::fs::create_dir(OLD_ROOT) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ChrootError::Mkdir {
                path: root.join(OLD_ROOT).display().to_string(),
                source,
            })
        }
    }
    pivot_root(".", OLD_ROOT).map_err(|errno| ChrootError::PivotRoot {
        path: root.display().to_string(),
        errno,
    })?;
    chdir("/").map_err(|errno| ChrootError::Chdir {
        path: "/".into(),
        errno,
    })?;
    umount2(OLD_ROOT, MntFlags::MNT_DETACH).map_err(ChrootError::Umount)?;
    std::fs::remove_dir(OLD_ROOT).map_err(ChrootError::RemoveOldRoot)
}

/// Creates `path` (and its parents) mode 0700 owned by `uid:gid`: a
/// directory the jailed process may write.
pub fn own_dir(path: &Path, uid: u32, gid: u32) -> Result<(), ChrootError> {
    make_dir(path, 0o700)?;
    chown_path(path, uid, gid)
}

/// Creates `path` (and its parents) mode 0755 owned by root: a directory
/// the jailed process may read but not change (so that it can neither
/// remove its exec file nor plant anything for a later run of its id).
pub fn root_dir(path: &Path) -> Result<(), ChrootError> {
    make_dir(path, 0o755)?;
    chown_path(path, 0, 0)
}

fn make_dir(path: &Path, mode: u32) -> Result<(), ChrootError> {
    let mkdir_err = |source| ChrootError::Mkdir {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(path).map_err(mkdir_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(mkdir_err)
}

fn chown_path(path: &Path, uid: u32, gid: u32) -> Result<(), ChrootError> {
    chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|errno| {
        ChrootError::Chown {
            path: path.display().to_string(),
            uid,
            gid,
            errno,
        }
    })
}

/// A character device the jailed VMM needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub path: PathBuf,
    pub major: u64,
    pub minor: u64,
}

/// `/dev/kvm`, `/dev/net/tun`, `/dev/urandom`, and `/dev/userfaultfd` when
/// `/proc/misc` (given as text) lists it.
pub fn vmm_devices(proc_misc: &str) -> Vec<DeviceNode> {
    let mut nodes = vec![
        DeviceNode {
            path: "/dev/kvm".into(),
            major: 10,
            minor: 232,
        },
        DeviceNode {
            path: "/dev/net/tun".into(),
            major: 10,
            minor: 200,
        },
        DeviceNode {
            path: "/dev/urandom".into(),
            major: 1,
            minor: 9,
        },
    ];
    let uffd = proc_misc.lines().find_map(|line| {
        let (minor, name) = line.trim().split_once(' ')?;
        (name.trim() == "userfaultfd").then(|| minor.parse::<u64>().ok())?
    });
    if let Some(minor) = uffd {
        nodes.push(DeviceNode {
            path: "/dev/userfaultfd".into(),
            major: 10,
            minor,
        });
    }
    nodes
}

/// Creates `node` (read-write for its owner only) owned by `uid:gid`,
/// replacing whatever is at its path.
pub fn make_device(node: &DeviceNode, uid: u32, gid: u32) -> Result<(), ChrootError> {
    // A node left by an earlier run of this id is made afresh.
    let _ = std::fs::remove_file(&node.path);
    mknod(
        &node.path,
        SFlag::S_IFCHR,
        Mode::S_IRUSR | Mode::S_IWUSR,
        makedev(node.major, node.minor),
    )
    .map_err(|errno| ChrootError::Mknod {
        path: node.path.display().to_string(),
        major: node.major,
        minor: node.minor,
        errno,
    })?;
    chown_path(&node.path, uid, gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_list() {
        let nodes = vmm_devices("232 kvm\n257 userfaultfd\n200 tun\n");
        let paths: Vec<_> = nodes.iter().map(|n| n.path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/dev/kvm",
                "/dev/net/tun",
                "/dev/urandom",
                "/dev/userfaultfd"
            ]
        );
        assert_eq!(nodes[3].minor, 257);
        assert_eq!(vmm_devices("232 kvm\n").len(), 3);
    }
}
